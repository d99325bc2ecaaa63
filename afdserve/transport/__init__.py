"""Transports that move hidden states and control frames between AFD workers."""
