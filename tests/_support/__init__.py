"""Helpers shared by the test areas, importable as `_support` from any test module or conftest.

pyproject's `pythonpath = ["tests"]` puts this folder's parent on sys.path (only that: the
checkout's `mup/` stays off it, so the suite can test an installed wheel). Under
`--import-mode=importlib` test modules cannot import a conftest.py; what they need lives here,
imported directly (no fixture that only hands out a function or a module).

checkpoints   tiny random llama checkpoints (transformers, safetensors) and a word tokenizer
configs       tiny model configs for models built in memory
toy           the finetune tests' toy stakes task: its words, records and tiny checkpoint
servers       free loopback ports and `python -m mup.serve` subprocesses
s3            a moto S3 server process on loopback and a boto3 client for it
hub           a loopback stand-in for the Hugging Face hub's file endpoint
stores        synthetic stakes data sets and activation stores with a planted signal
activations   synthetic in-memory ragged activations for probe tests
extract       running `python -m mup.extract` and comparing the stores it writes
scores        monitor score rows and an independent pairwise AUROC
"""
