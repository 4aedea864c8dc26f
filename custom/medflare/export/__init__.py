"""Exporting a job's global models for deployment: which network and sample input a job's
models take (:mod:`~medflare.export.job_model`), the saved checkpoint read back into it
(:mod:`~medflare.export.global_checkpoint`), and the server component that exports the final
and best global models at the end of a run (:mod:`~medflare.export.global_model_exporter`).
The export and its agreement check themselves are :mod:`medflare.training.model_export`.
"""
