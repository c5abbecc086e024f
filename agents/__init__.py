"""Orchestration: grounders (phrase + image -> regions), output parsing, anatomy checks, the ``ask`` and
``link-report`` pipelines and batch jobs. Inference only: nothing here imports :mod:`finetune`."""
