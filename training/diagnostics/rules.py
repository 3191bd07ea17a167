"""Every rule that reads a finished or running training run, in one place: the guide's training rules
(training_rules.py), the reported failures (failure_rules.py) and memory (memory_rules.py). The rule modules
share their fixes through patches.py, so none imports another and this module alone imports them all.
"""

from __future__ import annotations

from training.diagnostics.evidence import RunEvidence
from training.diagnostics.failure_rules import FAILURE_RULES
from training.diagnostics.findings import SEVERITY_ORDER, Finding
from training.diagnostics.memory_rules import MEMORY_RULES
from training.diagnostics.training_rules import TRAINING_RULES

RUN_RULES = TRAINING_RULES + FAILURE_RULES + MEMORY_RULES


def training_findings(evidence: RunEvidence) -> list[Finding]:
    """Every run rule's finding, errors first, then warnings, then information."""
    findings = [finding for rule in RUN_RULES if (finding := rule(evidence)) is not None]
    return sorted(findings, key=lambda finding: SEVERITY_ORDER[finding.severity])
