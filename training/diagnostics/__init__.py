"""Diagnostic rules: small pure functions from what is known about a run to findings.

`preflight` rules look at a run's evidence (config, dataset, model size, device) before anything trains; the
troubleshooting issue adds rules over live metrics and samples. Each finding says what is wrong in a
sentence, the evidence, and the config change that fixes it as a patch.
"""

from training.diagnostics.findings import Finding, Severity
from training.diagnostics.preflight import preflight_findings

__all__ = ["Finding", "Severity", "preflight_findings"]
