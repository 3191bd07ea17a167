"""What a diagnostic rule reports."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Severity = Literal["info", "warning", "error"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}  # how findings are listed: the most serious first


class Finding(BaseModel):
    rule: str = Field(description="Rule id, e.g. 'steps-vs-images'.")
    severity: Severity
    message: str = Field(description="One sentence a person understands.")
    evidence: dict[str, Any] = Field(default_factory=dict, description="The numbers behind the finding.")
    patch: dict[str, Any] = Field(default_factory=dict, description="Config changes that fix it (may be empty).")

    def line(self) -> str:
        fix = f" Suggested change: {self.patch}." if self.patch else ""
        return f"[{self.rule}] {self.message}{fix}"
