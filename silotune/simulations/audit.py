"""`silotune audit --empirical` on a simulated silo: its data rebuilt from the run config.

The audit itself (:func:`silotune.privacy.canary_audit.audit_silo`) takes the silo's rows
and id, as a deployed silo would pass its own; here they come from the simulated
federation's deterministic split (:func:`silotune.simulations.federation.federated_task`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from silotune.config import RunConfig
from silotune.privacy.canary_audit import (
    EmpiricalAudit,
    SiloAuditSpec,
    audit_silo,
    open_audit_ledger,
)
from silotune.simulations.federation import federated_task, silo_name


def audit_simulated_silo(run: RunConfig, spec: SiloAuditSpec, ledger_path: Path,
                         key_path: Path) -> tuple[EmpiricalAudit, dict[str, Any]]:
    """Run the empirical audit on simulated silo ``spec.silo_index`` of ``run`` (model,
    dataset, split, LoRA and batch settings) and append the signed ``audit`` entry to the
    silo's ledger with its existing signing key. Returns ``(audit, entry)``.

    Raises ValueError for a missing key, a ledger without a noise multiplier to take, an
    unknown dataset or a silo index out of range (checked in that order, before training).
    """
    open_audit_ledger(run, spec, ledger_path, key_path)  # fail before loading the data
    frame = federated_task(run).silo_frame(spec.silo_index)
    return audit_silo(run, spec, frame, silo_name(spec.silo_index), ledger_path, key_path)
