"""Calibrating the simulator from the real runtime: `profile` times the engine's parts on this
machine (`afdserve profile`), `validate_runtime` runs the engine and the simulator on the same
workload and compares them (`afdserve sim-validate runtime`).

Above both `afdserve.sim` (torch-free) and the runtime packages, so the simulator never imports
the runtime; torch is imported inside the functions that need it.
"""
