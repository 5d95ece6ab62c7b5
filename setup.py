from setuptools import find_packages, setup

setup(
    name="hvd_compress",
    version="0.1.0",
    description="Gradient compression (Top-k, Rand-k, natural, sign, QSGD, ...) with error feedback and "
                "the DoubleSqueeze server pass, as a plug-in for stock Horovod (PyTorch and TensorFlow)",
    packages=find_packages(include=["hvd_compress", "hvd_compress.*"]),
    python_requires=">=3.9",
    install_requires=["numpy"],
    extras_require={"torch": ["torch"], "tensorflow": ["tensorflow"], "examples": ["tqdm", "matplotlib"]},
)
