"""Attention-FFN disaggregation: the attention runner, the FFN worker, the links between them."""
