"""Wiring: builds engines from configs, in one process or across worker processes."""
