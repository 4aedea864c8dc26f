"""``medflare audit``: what a site's released update reveals about its patients, per privacy scope.

The site admin runs it at the site, on the site's own data, for a job folder it is asked to run:

* :mod:`~medflare.audit.scratch_site`: a scratch copy of the site's ``local/`` (privacy policy,
  budget, ledger and its seal), read by NVFlare's own configurator; the audit spends nothing
  from the real ledger, sends nothing and writes nothing to the workspace but its report;
* :mod:`~medflare.audit.job_under_audit`: the job's executor and filters, built from its client
  config as a FLARE client builds them, and the global model the server would send;
* :mod:`~medflare.audit.filter_round_trip`: one train task through the scope's task-data
  filters, the executor and the task-result filters (NVFlare's ``apply_filters``), and what
  came out as the server would decode it;
* :mod:`~medflare.audit.site_audit`: the attacks of :mod:`medflare.attacks` on what came out,
  scored against the true cases and the prior baseline, and the utility cost of each scope;
* :mod:`~medflare.audit.audit_report`: the JSON report, the table and the PNG montage.
"""
