"""Expert-parallel load balancing (EPLB), torch-free: the placement table of which FFN workers
hold which experts (placement.py), DeepSeek-style replicate-and-pack from measured load
(algorithm.py), the sliding window of that load (window.py), and the front's decision of when
to re-place (controller.py) from the contiguous start (initial.py)."""
