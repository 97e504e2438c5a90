"""Packaging for mmrecall: query -> product-photo ranking with TF Estimator."""
from setuptools import find_packages, setup

# The layers, lowest first (tests/imports_test.py keeps imports pointing down), and the
# fixtures shared by tests and benches.
PACKAGES = ("data_prep", "estimator", "export", "retrieval", "mmrecall_cli", "mmrecall_testing")

# Catalogue retrieval's ANN index (retrieval/ann.py). ScaNN, chosen by bench/retrieval.py
# (at recall@100 >= 0.97 of exact on 1M vectors it answers a single query several times
# faster than faiss IVF on 2 cores). Exactly 1.3.0: every later 1.3.x pulls TensorFlow 2.18
# and numpy 2, which breaks the pinned stack. faiss-cpu (1.15 installs beside numpy 1.26)
# is the other kind `mmrecall index --ann faiss-ivf` builds, and the bench's comparison.
RETRIEVAL = ["scann==1.3.0", "faiss-cpu>=1.15,<1.16"]
# `mmrecall index --runner beam` (retrieval/beam_embed.py): RunInference over the export.
# 2.68.0 is the newest release whose install leaves tensorflow 2.15.1, numpy 1.26 and
# protobuf 4.25 alone (2.69+ pull protobuf 6, which TensorFlow 2.15 refuses); it caps grpcio
# below 1.66, which TensorFlow and tensorflow-serving-api accept.
BEAM = ["apache-beam==2.68.0"]

setup(
    name="mmrecall",
    version="0.1.0",
    description=(
        "KDD Cup 2020 Multimodalities Recall: TSV -> TFRecords, a TF Estimator "
        "text/box transformer ranker, and a TF Serving SavedModel."
    ),
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, name + ".*")]),
    install_requires=[
        "tensorflow==2.15.1",
        "tensorflow-text==2.15.0",
        "google-crc32c>=1.5,<2",  # TFRecord framing in prep workers, without TensorFlow
        "pybase64>=1.4,<2",  # SIMD base64 decoding of the TSV fields in prep, ~4x the stdlib
        "numpy<2",
        "gensim>=4.3,<5",
        "spacy>=3.8,<3.9",
        "spacy-lookups-data>=1.0.5,<1.1",
        "pandas",
        "tqdm",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "tensorflow-serving-api==2.15.1",
            # Property-based fuzzing: random corruptions of TSV rows (tests/tsv_fuzz_test.py)
            # shrink to the smallest failing row, which hand-written cases cannot.
            "hypothesis>=6.100,<7",
        ] + RETRIEVAL + BEAM,               # tests/retrieval_*_test.py build both ANN kinds
                                            # and run the Beam pipeline (a few seconds)
        "retrieval": RETRIEVAL,
        "beam": BEAM,
        "serving": ["tensorflow-serving-api==2.15.1"],
    },
    entry_points={"console_scripts": ["mmrecall=mmrecall_cli:main"]},
)
