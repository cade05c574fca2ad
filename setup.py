"""edu_prm_jax: entropy-driven process reward models (EDU-PRM) in JAX/Flax NNX."""

from setuptools import find_namespace_packages, setup

RUNTIME = [
    "jax>=0.7.0",
    "flax>=0.11.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "ml-collections>=1.0.0",
    "tensorflow-datasets>=4.9.7",
    "array-record>=0.7.0",
    "grain>=0.2.10",
    "sentencepiece>=0.2.0",
    "tokenizers>=0.20.0",
    "safetensors>=0.4.5",
    "ml-dtypes>=0.5.0",
    "numpy>=1.26",
    "tqdm>=4.66",
    "absl-py>=2.1.0",
    "latex2sympy2_extended>=1.11,<2",  # LaTeX -> sympy parser of the answer checker (grading)
    "antlr4-python3-runtime==4.13.2",  # the ANTLR runtime its generated parser was built with
    "sympy>=1.13",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "pydantic>=2.6",  # typed inter-stage records (edu_prm_jax.records)
    "pebble>=5.0",  # the bounded answer-checking process pool (edu_prm_jax.grading)
    "etils[epath]>=1.7",  # every user path (gs:// included) goes through etils.epath (edu_prm_jax.io.storage)
    "gcsfs>=2024.2",  # epath's gs:// backend when TensorFlow is absent (imported only when a gs:// path is used)
]

TEST = [
    "pytest>=8.0",
    "pytest-xdist>=3.5",
    "hypothesis>=6",  # property tests of the record readers on malformed lines
    "portpicker>=1.6",
    "gcp-storage-emulator>=2024.8",  # tests/test_gcs.py: a GCS JSON API on loopback
    "torch==2.13.0",
    "transformers>=4.46",
    "ruff>=0.6",
    "import-linter>=2.0",  # the layer contracts in .importlinter
    "jax[tpu]",  # the [plan] extra: libtpu, so CI compiles tests/test_plan.py's programs for a TPU (no TPU needed)
]

# `edu-prm plan`: the compilers of the targets it plans for, used on a CPU host; never needed to run anything.
PLAN = ["jax[tpu]"]  # libtpu (~700 MB), the TPU compiler
PLAN_CUDA = ["jax[cuda12-local]",  # jax-cuda12-plugin + jax-cuda12-pjrt at jax's version, without CUDA wheels
             "nvidia-cudnn-cu12"]  # jax reads cuDNN's version while tracing the cuDNN attention kernel

setup(
    name="edu_prm_jax",
    version="0.1.0",
    description="EDU-PRM (entropy-driven process reward models) in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Namespace discovery also lists the data-only dirs (edu_prm_jax.assets.toy_policy: the shipped toy policy)
    # as packages, so their files go into the wheel; edu_prm_jax.configs is a regular package of .py configs.
    packages=find_namespace_packages(include=["edu_prm_jax", "edu_prm_jax.*"], exclude=["*__pycache__*"]),
    include_package_data=True,
    package_data={"edu_prm_jax.assets.toy_policy": ["*"]},
    install_requires=RUNTIME,
    extras_require={
        "test": TEST,
        # Accelerators: install JAX's own wheels next to the package.
        "cuda12": ["jax[cuda12]"],
        "cuda13": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
        "plan": PLAN,
        "plan-cuda": PLAN_CUDA,
    },
    entry_points={"console_scripts": ["edu-prm=edu_prm_jax.cli:main"]},
)
