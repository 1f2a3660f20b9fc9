"""How a patch reads to a person: ``slug inspect`` and the lines ``slug apply`` prints."""

from __future__ import annotations

from .format import Patch, _base_label


def describe(patch: Patch) -> str:
    """A short human summary: concept, method, base model, tensors (shape, dtype, relative change), η, metrics."""
    m = patch.meta
    lines = [
        f"slugkit patch (format {m.get('format_version')}, slugkit {m.get('toolkit_version')})",
        f"  concept:    {m.get('concept')}",
        f"  method:     {m.get('method')}",
        f"  base model: {_base_label(m)}  [adapter: {m.get('adapter')}]",
        f"  step size:  {m.get('step_size')}",
        f"  tensors ({len(patch.names)}, {patch.nbytes / 2**20:.2f} MiB incl. originals):",
    ]
    for name in patch.names:
        info = m["tensors"][name]
        rel = ""
        if name in patch.patched and name in patch.original and patch.original[name].is_floating_point():
            o = patch.original[name].double()
            d = (patch.patched[name].double() - o).norm()
            rel = f"  ‖Δ‖/‖θ‖={float(d / o.norm().clamp_min(1e-30)):.3g}"
        lines.append(f"    {name}  {info['dtype']}{tuple(info['shape'])}{rel}")
    for comp in m.get("components") or []:
        lines.append(f"  component: {comp.get('concept')} ({comp.get('method')}, η={comp.get('step_size')}) "
                     f"→ {', '.join(comp.get('tensors', []))}")
    metrics = m.get("metrics") or {}
    if metrics:
        lines.append("  metrics:")
        for k in sorted(metrics):
            v = metrics[k]
            lines.append(f"    {k}: {v:.4g}" if isinstance(v, float) else f"    {k}: {v}")
    return "\n".join(lines)
