"""The tcp handshake's two ends, without sockets: who gets bound to which rank, who is refused,
and that neither end can be talked into a binding without the key."""

from __future__ import annotations

import pytest

from afdserve.errors import ProtocolError
from afdserve.transport.tcp_handshake import (
    ClientHandshake,
    ServerGate,
    is_handshake,
    new_routing_id,
)

KEY = b"k" * 32
OTHER_KEY = b"x" * 32


def run(client: ClientHandshake, gate: ServerGate, ident: bytes):
    """Play the handshake to its end; the last Answer of the server."""
    msg = client.hello()
    while True:
        answer = gate.handle(ident, msg)
        msg = client.on_reply(answer.reply)
        if msg is None:
            return answer


def test_with_the_key_a_connection_is_bound_to_the_rank_it_proved():
    gate, ident = ServerGate(2, (0, 1), KEY), new_routing_id()
    client = ClientHandshake(1, 2, KEY, ident)
    assert gate.rank_of(ident) is None
    answer = run(client, gate, ident)
    assert client.done and answer.bound == 1 and not answer.refused
    assert gate.rank_of(ident) == 1
    assert gate.rank_of(new_routing_id()) is None  # another connection is not


def test_wrong_keys_fail_on_both_sides():
    gate, ident = ServerGate(2, (0, 1), KEY), new_routing_id()
    impostor = ClientHandshake(1, 2, OTHER_KEY, ident)
    challenge = gate.handle(ident, impostor.hello())
    # the client checks the server's MAC first: a server without its key fails that
    with pytest.raises(ProtocolError, match="failed to prove the group's key"):
        impostor.on_reply(challenge.reply)
    # and a forged AUTH (whatever MAC it carries) is refused by the server
    honest = ClientHandshake(1, 2, KEY, ident)
    hello = honest.hello()
    challenge = gate.handle(ident, hello)
    auth = bytearray(honest.on_reply(challenge.reply))
    auth[-1] ^= 1
    answer = gate.handle(ident, bytes(auth))
    assert answer.refused and "failed to prove the key" in answer.refused
    assert gate.rank_of(ident) is None
    with pytest.raises(ProtocolError, match="refused the connection of rank 1"):
        honest.on_reply(answer.reply)


def test_a_proof_does_not_carry_over_to_another_connection():
    """An AUTH seen on one connection is worthless on another: the MAC covers the routing id
    and the server's nonce of that connection."""
    gate = ServerGate(2, (0, 1), KEY)
    mine, theirs = new_routing_id(), new_routing_id()
    client = ClientHandshake(1, 2, KEY, mine)
    auth = client.on_reply(gate.handle(mine, client.hello()).reply)
    gate.handle(theirs, ClientHandshake(1, 2, OTHER_KEY, theirs).hello())  # their own challenge
    answer = gate.handle(theirs, auth)
    assert answer.refused and gate.rank_of(theirs) is None
    assert gate.handle(mine, auth).bound == 1  # the rightful owner still gets through


@pytest.mark.parametrize(
    "client_rank, server_rank, key, reason",
    [
        (1, 3, KEY, "this is rank 2, not rank 3"),
        (2, 2, KEY, "rank 2 is not a peer"),
        (5, 2, KEY, "rank 5 is not a peer"),
        (1, 2, b"", "authenticates with the group's key"),
    ],
)
def test_hellos_the_server_cannot_accept_are_refused(client_rank, server_rank, key, reason):
    gate, ident = ServerGate(2, (0, 1), KEY), new_routing_id()
    client = ClientHandshake(client_rank, server_rank, key, ident)
    answer = gate.handle(ident, client.hello())
    assert reason in answer.refused and gate.rank_of(ident) is None
    with pytest.raises(ProtocolError, match=reason):
        client.on_reply(answer.reply)


def test_a_keyed_client_refuses_an_open_server_and_vice_versa():
    open_gate, ident = ServerGate(2, (0, 1), b""), new_routing_id()
    answer = open_gate.handle(ident, ClientHandshake(1, 2, KEY, ident).hello())
    assert "has no key" in answer.refused
    # a keyed client never accepts a WELCOME it did not earn with its AUTH
    keyed = ClientHandshake(1, 2, KEY, ident)
    welcome = ServerGate(2, (0, 1), b"").handle(ident, ClientHandshake(1, 2, b"", ident).hello())
    keyed.hello()
    keyed._nonce = welcome.reply[6:22]  # the WELCOME's nonce, as if it answered this HELLO
    with pytest.raises(ProtocolError, match="unchallenged"):
        keyed.on_reply(welcome.reply)


def test_without_a_key_the_first_connection_keeps_its_rank():
    gate = ServerGate(2, (0, 1), b"")
    first, second = new_routing_id(), new_routing_id()
    assert run(ClientHandshake(0, 2, b"", first), gate, first).bound == 0
    answer = gate.handle(second, ClientHandshake(0, 2, b"", second).hello())
    assert "rank 0 is connected already" in answer.refused
    assert gate.rank_of(first) == 0 and gate.rank_of(second) is None


def test_with_the_key_a_proven_reconnect_replaces_the_earlier_connection():
    gate = ServerGate(2, (0, 1), KEY)
    old, new = new_routing_id(), new_routing_id()
    run(ClientHandshake(0, 2, KEY, old), gate, old)
    run(ClientHandshake(0, 2, KEY, new), gate, new)
    assert gate.rank_of(new) == 0 and gate.rank_of(old) is None


def test_a_retried_hello_makes_earlier_replies_stale():
    gate, ident = ServerGate(2, (0, 1), KEY), new_routing_id()
    client = ClientHandshake(1, 2, KEY, ident)
    first = gate.handle(ident, client.hello())
    second = gate.handle(ident, client.hello())  # the first reply was late: the client retried
    assert client.on_reply(first.reply) is None  # ignored
    answer = gate.handle(ident, client.on_reply(second.reply))
    assert answer.bound == 1 and client.on_reply(answer.reply) is None and client.done


@pytest.mark.parametrize(
    "msg",
    [
        b"AFDH",
        b"AFDH\x01",
        b"AFDH\x02\x01" + bytes(40),
        b"AFDH\x01\x01" + bytes(3),
        b"AFDH\x01\x09",
    ],
)
def test_mangled_handshake_messages_are_protocol_errors(msg):
    assert is_handshake(msg)
    with pytest.raises(ProtocolError):
        ServerGate(2, (0, 1), KEY).handle(new_routing_id(), msg)


def test_half_done_handshakes_are_bounded():
    from afdserve.transport.tcp_handshake import MAX_PENDING

    gate = ServerGate(2, (0, 1), KEY)
    for _ in range(3 * MAX_PENDING):
        ident = new_routing_id()
        gate.handle(ident, ClientHandshake(1, 2, KEY, ident).hello())
    assert len(gate._pending) == MAX_PENDING


def test_routing_ids_are_random_and_never_start_with_zero():
    ids = {new_routing_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 16 and i[0] != 0 for i in ids)
