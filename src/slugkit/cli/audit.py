"""``slug audit``: does a removal hold? (:mod:`slugkit.audit`), and the ``--audit`` option of ``demo`` / ``unlearn``.

    slug audit --patch RUN_OR_PATCH [--model embedded] [--concept NAME] [--out DIR] [--probes a,b,...]

``--patch`` takes a patch folder or a run folder (its ``patch/``); a run folder is also the default ``--out`` (the
audit section is added to its ``report.md``). Exit status: 0 every gating probe passed, 3 a warning, 4 a failure,
2 a usage or input error.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..common.text import printable
from ..workflows.audit_fold import pending, run_took_in_audit
from .args import COUNT, THREADS, float_at_least, item_list, nonempty, refuse, split_list, template
from .outputs import out_inside_run

AUDIT_EXIT = {"pass": 0, "warn": 3, "fail": 4}


def add_audit_budget_args(p) -> None:
    """The probes and their budgets (shared by ``slug audit`` and ``--audit`` of the run commands); the parser records
    each one's default in ``audit_defaults`` for :func:`unread_audit_options`."""
    from ..audit import PROBES

    g = p.add_argument_group("audit probes and budgets (slug audit; documented in slugkit.audit)")
    g.add_argument("--probes", type=item_list, default=",".join(PROBES),
                   help=f"comma list of probes to run (default all: {','.join(PROBES)})")
    g.add_argument("--attack-iterations", type=COUNT, default=40, help="GCG iterations per search (default 40)")
    g.add_argument("--attack-candidates", type=COUNT, default=64,
                   help="candidate prompts scored per GCG iteration (default 64)")
    g.add_argument("--attack-tokens", type=COUNT, default=8, help="free tokens after 'a photo of <name>' (default 8)")
    g.add_argument("--attack-restarts", type=COUNT, default=3, help="GCG restarts, curves averaged (default 3)")
    g.add_argument("--relearn-steps", type=COUNT, default=30, help="fine-tuning steps of the relearning probe "
                                                                   "(default 30)")
    g.add_argument("--relearn-sizes", type=item_list, default="5,20",
                   help="comma list of forget-pair counts n (default 5,20)")
    g.add_argument("--relearn-lr", type=float_at_least(1e-12), default=1e-4,
                   help="AdamW learning rate of the relearning probe (default 1e-4: the embedded model; ~1e-5 suits "
                        "a pretrained CLIP)")
    g.add_argument("--control-name", type=nonempty, action="append", default=None,
                   help="a name the model never learned, the attack's and relearning's control (repeatable; default "
                        "three invented names)")
    g.add_argument("--audit-images", type=COUNT, default=10,
                   help="text-to-image audit: images generated per prompt, before and after (default 10)")
    g.add_argument("--audit-gen-steps", type=COUNT, default=20,
                   help="text-to-image audit: DDIM steps per image (default 20)")
    g.add_argument("--gate-representation", action="store_true",
                   help="let the representation probe change the exit status (default: reported only)")
    p.set_defaults(audit_defaults={x.dest: x.default for x in g._group_actions})


# the audit options each audit reads (the VLM audit ran its fixed budgets under --relearn-steps 5, the CLIP audit
# under --audit-images, the run commands without --audit took them all, without a word)
AUDIT_READS = {"CLIP": frozenset({"probes", "attack_iterations", "attack_candidates", "attack_tokens",
                                  "attack_restarts", "relearn_steps", "relearn_sizes", "relearn_lr", "control_name",
                                  "gate_representation"}),
               "text-to-image": frozenset({"probes", "attack_iterations", "attack_candidates", "attack_tokens",
                                           "audit_images", "audit_gen_steps"}),
               "VLM": frozenset({"probes", "gate_representation"})}


def unread_audit_options(a, kind: str | None) -> str | None:
    """The refusal for audit options given (``a.audit_defaults``: their defaults) that the audit of ``kind`` (a key
    of :data:`AUDIT_READS`; None: a run command without ``--audit``) does not read; None when there are none."""
    defaults = getattr(a, "audit_defaults", None) or {}
    reads = AUDIT_READS[kind] if kind else frozenset()
    given = ["--" + k.replace("_", "-") for k, d in defaults.items() if k not in reads and getattr(a, k, d) != d]
    if kind == "VLM" or kind == "text-to-image":
        given += ["--device"] if getattr(a, "device", "cpu") not in ("cpu", None) else []
    if not given:
        return None
    them = "them" if len(given) > 1 else "it"
    if kind is None:
        return f"{', '.join(given)}: audit option(s), read only with --audit; add --audit or drop {them}"
    has = [k for k in sorted(reads) if k in defaults]
    return (f"{', '.join(given)}: not read by the audit of a {kind} patch"
            + (" (it runs on the CPU)" if "--device" in given else "")
            + f"; drop {them}" + (f" (it reads {', '.join('--' + k.replace('_', '-') for k in has)})" if has else ""))


def audit_options(a) -> dict:
    """``run_audit`` keyword arguments from the parsed options. Raises ``ValueError`` naming the bad option."""
    from ..audit import PROBES, AttackBudget, RelearnBudget

    probes = split_list(a.probes)
    bad = [p for p in probes if p not in PROBES]
    if not probes or bad:
        got = ", ".join(repr(printable(b)) for b in bad) or "empty list"  # a list's repr was printed (trial 38)
        raise ValueError(f"--probes: unknown {got}; choose from {','.join(PROBES)}")
    try:
        sizes = tuple(int(x) for x in split_list(a.relearn_sizes))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--relearn-sizes: expected a comma list of positive integers, got {a.relearn_sizes!r}")
    return {"probes": probes, "gate_representation": a.gate_representation,
            "attack": AttackBudget(n_tokens=a.attack_tokens, iterations=a.attack_iterations,
                                   candidates=a.attack_candidates, restarts=a.attack_restarts),
            "relearn": RelearnBudget(sizes=sizes, steps=a.relearn_steps, lr=a.relearn_lr),
            "progress": not getattr(a, "no_progress", False)}


def _patch_and_out(a) -> tuple[Path, Path]:
    p = Path(a.patch)
    if p.is_file():  # RUN/patch/patch.json: its folder (another file said "--out is required")
        if p.name not in ("patch.json", "patch.safetensors"):
            raise ValueError(f"--patch {a.patch}: is a file, not a patch; a patch is a folder holding patch.json and "
                             "patch.safetensors (a run's is RUN/patch)")
        p = p.parent
    run = p if (p / "patch" / "patch.json").is_file() else None
    if run is None and p.name == "patch" and (p / "patch.json").is_file() and (p.parent / "result.json").is_file():
        run = p.parent  # RUN/patch given for RUN: the run folder is the default --out, as for RUN
    patch = run / "patch" if run else p
    if p.is_dir() and not (patch / "patch.json").is_file():  # a compare run: slug/patch (thirteenth trial)
        from .inspect_cmd import say_found

        patch, run = say_found(str(p), "--patch"), p  # the one patch below it (or names them); the audit goes into p
    if not (patch.is_dir() and (patch / "patch.json").is_file()):
        if not p.exists():
            from ..patch.format import resolve_patch_dir

            resolve_patch_dir(p)  # raises, saying a symbolic link leads nowhere
        raise ValueError(f"--patch {a.patch}: holds no patch.json, so it is not a patch; a patch folder holds "
                         "patch.json and patch.safetensors (a run's is RUN/patch)")  # inspect's words (23rd trial)
    if a.out is None and run is None:
        raise ValueError("--out is required when --patch is a patch folder (a run folder is its own default --out)")
    out = Path(a.out) if a.out else run
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file is there; --out is a folder (created if missing)")
    from ..common.outguard import inside_run, writer_of

    if a.out and out_inside_run(a.out) and a.out.startswith("~"):
        raise ValueError(out_inside_run(a.out))
    holder = inside_run(out)
    if holder is not None:  # RUN/patch/audit.json made RUN's next --overwrite refuse "files slug did not write"
        raise ValueError(f"--out {out}: is inside the run folder {holder[0]}; write the audit into the run folder "
                         "itself (the default for --patch RUN) or outside it")
    for d in (out, *out.resolve().parents):  # the audit would land in a folder that is about to be replaced
        writer = writer_of(d)
        if writer:
            raise ValueError(f"--out {out}: another slug run is writing {d} ({writer}); wait for it to finish")
    for flag, path, want in (("--test-identities", getattr(a, "test_identities", None), "dir"),
                             ("--train-identities", getattr(a, "train_identities", None), "dir"),
                             ("--names", getattr(a, "names", None), "file")):
        if path and not (Path(path).is_dir() if want == "dir" else Path(path).is_file()):
            other = Path(path).is_file() if want == "dir" else Path(path).is_dir()  # "no such file" of a folder: 23rd
            raise ValueError(f"{flag} {path}: " + (("is a file; give a folder of class folders <Name>/<image>"
                                                    if want == "dir" else "is a folder; give a text file, one name per "
                                                    "line") if other else
                                                   f"no such {'folder' if want == 'dir' else 'file'}"))
    return patch, out


def cmd_audit(a) -> int:
    """`slug audit`, one at a time per --out (:func:`slugkit.common.sentinel.one_writer`: two audits into one folder
    both said "wrote", and one's files were the other's; verify 47)."""
    from ..common.sentinel import one_writer

    with one_writer(_patch_and_out(a)[1]):
        return _cmd_audit(a)


def _cmd_audit(a) -> int:
    from ..audit import audit_patch, folder_audit_data
    from ..audit.run import AUDIT_JSON, AUDIT_MD
    from ..audit.data import name_list

    opts = audit_options(a)
    patch, out = _patch_and_out(a)
    if a.threads is None and a.model == "embedded":
        a.threads = 1  # as `slug demo`: as fast for the tiny models, and the same audit.json on every machine
    there = [n for n in (AUDIT_JSON, AUDIT_MD) if (out / n).exists()]
    if there and run_took_in_audit(out):  # the run's verdict cites it: replacing it left "Audit: pass" over "fail"
        return refuse(f"{out} is a run whose verdict includes the audit run with it (result.json → audit, "
                      f"{out / AUDIT_JSON}); write this audit elsewhere (--out DIR), which keeps that evidence")
    if there and not a.overwrite:  # audit.md alone was overwritten without a word
        return refuse(f"{out / there[0]} exists; pass --overwrite to replace it")
    from ..audit.downstream import patch_kind
    from ..patch import load_patch

    kind = patch_kind(load_patch(patch))
    if kind == "VLM" and a.model != "embedded":  # taken for a CLIP audit: refusals in a circle (trial 27)
        return refuse(f"--model {a.model}: this patch is of the embedded VLM and is audited on the VLM it was "
                      "judged on (recorded in the patch); drop --model")
    if kind != "CLIP" and a.model == "embedded":
        msg = _downstream_unused(a, patch, kind)
        return refuse(msg) if msg else _print_audit(_downstream(patch, out, a, kind), out)
    msg = unread_audit_options(a, "CLIP")
    if msg:
        return refuse(msg)
    meta = load_patch(patch).meta
    made_on = meta["base_model"].get("model") if isinstance(meta.get("base_model"), dict) else None
    if made_on and (made_on == "embedded") != (a.model == "embedded"):  # it asked for data first (trial 38)
        return refuse(f"--model {printable(a.model)}: the patch at {printable(str(patch))} was made on "
                      f"{'the embedded model' if made_on == 'embedded' else printable(made_on)}; audit it on that "
                      f"model (--model {printable(made_on)}), where its originals are")
    data = None
    if a.test_identities or a.model != "embedded":
        if not a.test_identities:
            return refuse("--test-identities is required for a model other than the embedded one (and --names for "
                          "the full name list; --train-identities for the relearning and representation probes)")
        names = name_list(a.names, a.test_identities)

        def data(adapter, concept):
            return folder_audit_data(adapter, concept, names, a.identity_template or ["{}."], a.test_identities,
                                     train_identities=a.train_identities, controls=a.control_name,
                                     aliases=a.alias or [])
    from ..patch.summary import family_mismatch

    why = family_mismatch(a.family, [meta])
    if why:
        raise ValueError(why)
    if a.family is None:  # the patch's adapter, as `slug apply` (an hf_clip patch was audited on open_clip)
        a.family = "hf_clip" if meta.get("adapter") == "hf_clip" else "open_clip"
    base = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
    if a.pretrained is None and base.get("pretrained") and base.get("model") == a.model:
        a.pretrained = base["pretrained"]  # the patch's own checkpoint: the shipped weights were audited (14th trial)
        print(f"note: auditing on the patch's base checkpoint {printable(a.pretrained)} (--pretrained)",
              file=sys.stderr)
    from .patches import step_hint

    with step_hint([patch], audit=True):
        result = audit_patch(patch, a.model, a.concept, pretrained=a.pretrained, family=a.family, data=data,
                             controls=a.control_name, aliases=a.alias, device=a.device, out=out, threads=a.threads,
                             overwrite=True, **opts)  # an audit in --out was refused above without --overwrite
    return _print_audit(result, out)


def _print_audit(result: dict, out: Path) -> int:
    from ..audit.report import TITLES, bound_mark
    from ..audit.run import AUDIT_JSON

    print(f"audit of {result['concept']} ({result['seconds']:.0f} s): {result['status']}"
          + (f" — {result['status_note']}" if result.get("status_note") else ""))
    if result.get("patch_run_verdict") == "fail":  # a plain "pass" read as all good (set by write_audit)
        from ..audit.report import audit_scope

        print(f"  note: the run that made this patch had verdict fail ({result.get('patch_run_why') or 'see below'}; "
              f"see its result.json): {audit_scope(result)}")
    elif result.get("patch_run_verdict") == "warn":  # said in audit.json only (eighteenth trial)
        print("  note: the run that made this patch had verdict warn"
              + (f" ({result['patch_run_why']})" if result.get("patch_run_why") else "")
              + "; its warnings are in that run's result.json")
    for rec in result["probes"]:
        gate = "" if rec.get("gating") else " (not gating)"
        g = rec.get("graded") if isinstance(rec.get("graded"), dict) else None
        bound = bound_mark(g)
        graded = (f"; graded on the {g['name']}: {bound}{g['value']:.2f} (pass ≤ {g['pass_at']:g}, fail > "
                  f"{g['fail_at']:g})"
                  if g and "value" in g and "graded on" not in rec["summary"] else "")  # the number that decides
        print(f"  {TITLES[rec['probe']]:32s} {rec['status']:7s}{gate}  {rec['summary']}{graded}")
    print(f"wrote {printable(out / AUDIT_JSON)} and {printable(out / 'audit.md')}" + (" (and its section of report.md)"
                                                                 if (out / "report.md").is_file() else ""))
    return AUDIT_EXIT[result["status"]]


CLIP_AUDIT_FLAGS = ("alias", "test_identities", "train_identities", "names", "identity_template", "control_name",
                    "pretrained", "family")


def _downstream_unused(a, patch: Path, kind: str) -> str | None:
    """A refusal for options the embedded text-to-image / VLM audit does not read: another --concept than the patch
    removed, or the CLIP audit's data and model options (the VLM audit audited the patch's concept whatever
    --concept named, a typo too, and dropped --alias and bogus --test-identities/--names without a word; trial 26)."""
    from ..audit.run import audited_concept
    from ..patch import load_patch

    try:
        audited_concept(patch, load_patch(patch).meta.get("concept"), a.concept)  # the CLIP audit's own check
    except ValueError as e:
        return str(e)
    given = ["--" + f.replace("_", "-") for f in CLIP_AUDIT_FLAGS if getattr(a, f, None) is not None]
    if given:
        return (f"{', '.join(given)}: {'apply' if len(given) > 1 else 'applies'} to the audit of a CLIP patch; this "
                f"patch is of the embedded {kind} model, audited on it and on the world's images: drop "
                f"{'them' if len(given) > 1 else 'it'}")
    return unread_audit_options(a, kind)


def audit_vlm(patch: Path, out: Path, a) -> dict:
    """The VLM audit (:func:`slugkit.audit.downstream.audit_vlm_patch`) of an embedded VLM demo patch, into ``out``."""
    pending(out)  # recorded unfinished until it ends (verify 47)
    return _downstream(patch, out, a, "VLM")


def audit_sd(patch: Path, out: Path, a) -> dict:
    """The text-to-image audit (:func:`slugkit.audit.downstream.audit_t2i_patch`) of an embedded SD demo patch."""
    pending(out)  # recorded unfinished until it ends (verify 47)
    return _downstream(patch, out, a, "text-to-image")


def _downstream(patch: Path, out: Path, a, kind: str) -> dict:
    import torch

    from ..audit import AttackBudget
    from ..audit.downstream import audit_t2i_patch, audit_vlm_patch
    from ..patch import load_patch

    opts = audit_options(a)
    before_threads = torch.get_num_threads()
    try:
        if getattr(a, "threads", None):
            torch.set_num_threads(a.threads)
        p = load_patch(patch)
        if kind == "VLM":
            return audit_vlm_patch(p, str(patch), out, probes=opts["probes"],
                                   gate_representation=opts["gate_representation"], progress=opts["progress"])
        attack = AttackBudget(n_tokens=a.attack_tokens, iterations=a.attack_iterations,
                              candidates=a.attack_candidates, restarts=1)
        return audit_t2i_patch(p, str(patch), out, probes=opts["probes"], attack=attack, n_images=a.audit_images,
                               gen_steps=a.audit_gen_steps, progress=opts["progress"],
                               t2i_dir=getattr(a, "t2i_model", None))
    finally:
        torch.set_num_threads(before_threads)


def audit_run_folder(out: str | Path, a, result: dict, data=None) -> int | None:
    """``--audit`` of ``slug demo`` / ``slug unlearn``: audit the run just written in ``out`` (``data``: as
    :func:`slugkit.audit.audit_patch` takes it; None: the embedded world's). Returns the audit's exit status, None
    when the run wrote no patch."""
    from ..audit import audit_patch

    patch = Path(out) / "patch"
    if not (patch / "patch.json").is_file():
        print("audit: no patch was written; nothing to audit", file=sys.stderr)
        return None
    m = result.get("model") if isinstance(result.get("model"), dict) else {}
    pending(out)  # recorded unfinished until it ends (verify 47)
    res = audit_patch(patch, m.get("model", "embedded"), None, pretrained=m.get("pretrained"),
                      family=m.get("family", "open_clip"),
                      data=data, controls=a.control_name, device=getattr(a, "device", "cpu"), out=out, overwrite=True,
                      threads=getattr(a, "threads", None),
                      **audit_options(a))
    return AUDIT_EXIT[said_audit(out, res)["status"]]


def said_audit(out, res: dict) -> dict:
    """Print the one-line outcome of an audit run with its run (``--audit``), fold it into the run's verdict
    (:mod:`slugkit.workflows.audit_fold`) and say the verdict now. Returns ``res``."""
    from ..workflows.audit_fold import fold_audit
    from ..audit.report import TITLES

    print(f"audit ({res['seconds']:.0f} s): {res['status']} — " + ("; ".join(
        f"{TITLES[r['probe']]} {r['status']}" + ("" if r.get("gating") else " (not gating)") for r in res["probes"])
        or "no probe ran") + f" (see {printable(Path(out) / 'audit.md')})")
    verdict = fold_audit(out, res)
    if verdict and res.get("status") in ("warn", "fail"):
        print(f"verdict (with the audit): {verdict['status']} — result.json, report.md and the patch say so")
    return res


def add_parsers(sub) -> None:
    """Add the `audit` subcommand to ``sub``."""
    p = sub.add_parser("audit", help="does a removal hold? probe a patch with prompt variants, adversarial prompts, "
                                     "reduced precision, relearning and a linear probe")
    p.add_argument("--patch", required=True, help="a patch folder, or a run folder (its patch/; also the default "
                                                  "--out)")
    p.add_argument("--model", default="embedded", help="the base model the patch was made for (default embedded; "
                                                       "other models need --test-identities and --names)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or a local .safetensors file")
    p.add_argument("--family", default=None, choices=["open_clip", "hf_clip"],
                   help="the model family of --model (default: the patch's adapter; hf_clip: a transformers CLIPModel)")
    p.add_argument("--concept", default=None, help="the forgotten name (default: the patch's concept)")
    p.add_argument("--out", default=None, help="folder for audit.json / audit.md (default: the run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing audit.json in --out")
    p.add_argument("--test-identities", default=None, help="class folder <Name>/*.jpg of held-out images (a real "
                                                           "model's data; the embedded world's otherwise)")
    p.add_argument("--train-identities", default=None,
                   help="class folder of training-split images (the relearning and representation probes)")
    p.add_argument("--names", default=None, help="file with the full identity name list (one per line)")
    p.add_argument("--identity-template", type=template, action="append", default=None,
                   help="zero-shot prompt with {} as the run used it, for --test-identities data (repeatable; "
                        "default '{}.'; the embedded world uses its own caption templates)")
    p.add_argument("--alias", type=nonempty, action="append", default=None,
                   help="another name of the concept, tried as a variant (repeatable)")
    p.add_argument("--threads", type=THREADS, default=None,
                   help="torch CPU threads (default 1 for the embedded models, as slug demo: bit-identical audits; "
                        "torch's choice for others)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    add_audit_budget_args(p)
    p.set_defaults(func=cmd_audit)


__all__ = ["add_audit_budget_args", "add_parsers", "audit_options", "audit_run_folder", "cmd_audit"]
