"""From the user's settings to a run: the resolved run config (:mod:`fedwa.run.config`) and the
one place that builds the run's parts from it (:mod:`fedwa.run.compose`)."""
