"""Tools that drive a vLLM engine for the shape policy: record trace tables (`record`), measure
this machine's cost profile with the engine's step clock (`profile`), compare the simulator with
the engine (`check`) and time the policy inside a step (`bench_policy`). They sit above the
algorithms (`vllm_respsp.policy`, `vllm_respsp.tree`), which never import them."""
