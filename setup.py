"""Packaging for mmrecall: query -> product-photo ranking with TF Estimator."""
from setuptools import setup

setup(
    name="mmrecall",
    version="0.1.0",
    description=(
        "KDD Cup 2020 Multimodalities Recall: TSV -> TFRecords, a TF Estimator "
        "text/box transformer ranker, and a TF Serving SavedModel."
    ),
    python_requires=">=3.11,<3.12",
    packages=["data_prep", "estimator", "export", "mmrecall_cli", "mmrecall_testing"],
    install_requires=[
        "tensorflow==2.15.1",
        "tensorflow-text==2.15.0",
        "google-crc32c>=1.5,<2",  # TFRecord framing in prep workers, without TensorFlow
        "numpy<2",
        "gensim>=4.3,<5",
        "spacy>=3.8,<3.9",
        "spacy-lookups-data>=1.0.5,<1.1",
        "pandas",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "tensorflow-serving-api==2.15.1"],
        "serving": ["tensorflow-serving-api==2.15.1"],
    },
    entry_points={"console_scripts": ["mmrecall=mmrecall_cli:main"]},
)
