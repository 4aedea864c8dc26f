"""``medflare prepare``: one versioned preparation every site runs the same way, and its proof.

The Flywheel-style habit (containerised, version-controlled preparation before federated
training) in a package pure of NVFlare:

- :mod:`.recipe`: what a preparation is (a name, :data:`~.recipe.PREPARATION_VERSION`, its
  parameters and their hash);
- :mod:`.case_qc`: per-case verdicts (pass / fail with reasons, warnings);
- :mod:`.segmentation_steps`, :mod:`.xray_steps`: read, check, normalise, resample, write;
- :mod:`.prepare_segmentation`, :mod:`.prepare_xray`: a whole data set, with the prepared
  datalist or table, the site's data configuration and the manifest (:mod:`.manifest`);
- :mod:`.verification`: what an executor checks before it trains (:func:`~.verification.verify_preparation`);
- :mod:`.file_hashes`: sha256 of files, once per file state per process;
- :mod:`.qc_report`: the site-local QC summary and intensity histograms.
"""
