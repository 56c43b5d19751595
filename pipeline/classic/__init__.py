"""Classic-model teaching modules, each runnable alone: ``python -m pipeline.classic NAME [--quick]``.

Every module exposes ``run(quick: bool, out_dir: Path) -> dict`` (its metrics) and saves its
plots into ``out_dir`` (reports/classic/ by default).
"""
MODULES = ("logistic", "softmax", "shallow", "deep", "cnn", "rnn", "skipgram", "seq2seq", "tinygpt")
