"""sparsejax: pure functional pruning and sparse training for JAX and Flax."""

import setuptools

setuptools.setup(
    name="sparsejax",
    version="0.1.0",
    description="Pure functional mask transforms for pruning and sparse training in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["sparsejax", "sparsejax.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "tensorflow-datasets",
        "array-record",  # TFDS random-access files: datasets load without TensorFlow
        "grain",  # the input pipeline: batches read, decoded and augmented by workers
        "importlib-resources",  # TFDS needs it to prepare a locally defined dataset
        "chex",
        "absl-py",
        "ml-collections",
        "numpy",
        "scikit-learn",  # bundled digits: the offline default dataset
        "tensorboard",  # its event writer needs no TensorFlow
        "matplotlib",
        "pillow",  # TFDS decodes PNG-encoded Image features with it (no TensorFlow)
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "sphinx", "myst-parser",
                 "safetensors"],
        # Hugging Face checkpoints checked against the reference implementation
        # (tests marked `hf`): transformers with CPU torch.
        "hf": ["safetensors", "transformers", "torch"],
    },
)
