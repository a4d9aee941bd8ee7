"""vllm-respsp: speculative decoding with per-sequence, per-step learned EAGLE-3 draft trees."""

__version__ = "0.1.0"
