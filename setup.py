"""Packaging for mtsl-plugin: Multi-Task Structural Learning as a LibMTL architecture."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mtsl-plugin",
    version="0.1.0",
    description="Multi-Task Structural Learning (ICML 2023): learn a multi-task network's branching "
    "architecture and weights together, as a LibMTL-compatible architecture on timm CNNs.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8")
    if Path(__file__).with_name("README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mtsl_plugin", "mtsl_plugin.*", "baselines", "baselines.*", "benchmarks", "benchmarks.*"]),
    package_data={"mtsl_plugin": ["presets/*.yaml"]},
    install_requires=[
        "torch>=2.4",  # torch.get_autocast_dtype, torch.is_autocast_enabled(device)
        "torchvision>=0.19",
        "libmtl==1.1.5",
        "scipy>=1.10",  # LibMTL imports it (CAGrad) without declaring it
        "timm>=1.0",
        "segmentation-models-pytorch>=0.3",
        "torchmetrics>=1.3",
        "pluggy>=1.3",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
        "imagecorruptions-imaug>=1.1.5",  # the natural corruptions of benchmarks/robustness.py
    ],
    extras_require={"export": ["onnx>=1.15", "onnxruntime>=1.17"],
                    "test": ["pytest>=7.4", "onnx>=1.15", "onnxruntime>=1.17"]},
    entry_points={
        # one command per benchmarks/<name>.py that the README runs as `python benchmarks/<name>.py`
        "console_scripts": ["mtsl-compare=benchmarks.compare:main", "mtsl-robustness=benchmarks.robustness:main",
                            "mtsl-ablation=benchmarks.ablation:main", "mtsl-sensitivity=benchmarks.sensitivity:main",
                            "mtsl-alignment=benchmarks.alignment:main", "mtsl-export=benchmarks.export:main",
                            "mtsl-speed=benchmarks.speed:main", "mtsl-scaling=benchmarks.scaling:main",
                            "mtsl-grouping-speed=benchmarks.grouping_speed:main"],
    },
)
