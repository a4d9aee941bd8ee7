"""The respsp runtime inside vLLM's model runner: tree drafting, tree verification inputs,
the tree rejection sampler and KV compaction. `vllm_respsp.patches.runner` connects it to vLLM;
everything here works on plain tensors plus the loaded draft module."""
