"""Deliberate bugs in keras-rdrop, one at a time: the suite must catch each.

Each mutant replaces one exact piece of text in one file (it must occur
exactly once there) in a scratch copy of the checkout, then runs pytest there
with the interpreter of a tox env, on the files that own the behaviour. A
mutant is *killed* when pytest fails. Those files are part of the suite, so a
kill by them is a kill by the whole suite; `--full` runs every test instead.
Before the mutants, the same test files run on the unmutated copy and must
pass, so a kill is never a test that was already red.

Usage (from the repository root, after `tox -e torch -- --collect-only -q`
or any run that built the env; `--notest` skips the Keras 3.16 install):

    python tools/mutants.py                      # every mutant, a table
    python tools/mutants.py --only kl-direction  # one of them
    python tools/mutants.py --list
    python tools/mutants.py --env-dir .tox       # where the tox envs live

The table (Markdown) goes to stdout; pytest's output of a surviving mutant
goes to stderr. Exit status 1 if any mutant survived.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    what: str  # the bug, in words
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    backend: str = "torch"


S = "keras_rdrop/src/"
MUTANTS = [
    Mutant(
        "step-sequential-one-pass",
        "in sequential mode the second pass is the first one again",
        S + "step_mode.py",
        "            second = head(source, training=True)\n",
        "            second = first\n",
        ("tests/test_rdrop_model.py", "tests/test_step_mode.py"),
    ),
    Mutant(
        "step-prefix-not-carried",
        "the training call drops the prefix's output the reference reuses",
        S + "step_mode.py",
        "first, second, prefix if self.reference_reuses_prefix else None",
        "first, second, None",
        ("tests/test_step_mode.py", "tests/test_shared_prefix.py"),
    ),
    Mutant(
        "step-stacked-in-sequential",
        "sequential mode stacks its passes as concat mode does",
        S + "step_mode.py",
        'stacked=rdrop and mode == "concat",',
        "stacked=rdrop,",
        ("tests/test_step_mode.py", "tests/test_shared_prefix.py"),
    ),
    Mutant(
        "step-reuse-of-a-copied-prefix",
        "the reference reuses a frozen prefix whose weights the snapshot copied",
        S + "step_mode.py",
        "        and not reference.snapshot.copies_any("
        "reference.model, split.prefix.weights)\n",
        "",
        ("tests/test_step_mode.py", "tests/test_shared_prefix.py"),
    ),
    Mutant(
        "step-metrics-on-the-second-pass",
        "the training metrics measure the second pass",
        S + "rdrop_model.py",
        "x, y, y_pred.first if training else y_pred, sample_weight",
        "x, y, y_pred.second if training else y_pred, sample_weight",
        ("tests/test_step_mode.py", "tests/test_rdrop_model.py"),
    ),
    Mutant(
        "step-decided-at-every-call",
        "the step mode is decided again at each call instead of once",
        S + "rdrop_model.py",
        "        if state not in self._step_modes:  # a call outside `fit`\n",
        "        if True:\n",
        ("tests/test_step_mode.py",),
    ),
    Mutant(
        "alpha-legacy-file",
        "alpha's variables in a file from before `AlphaState` are not loaded",
        S + "rdrop_model.py",
        "        if own:\n",
        "        if False:\n",
        ("tests/test_alpha_state.py",),
    ),
    Mutant(
        "alpha-schedule-switches-off",
        "a schedule that is 0 at the start switches the second pass off",
        S + "alpha_state.py",
        "        if is_scheduled(self.alpha):\n            return True\n",
        "",
        ("tests/test_alpha_state.py", "tests/test_alpha_schedule.py"),
    ),
    Mutant(
        "kl-direction",
        "`kind='kl'` computes KL(b‖a) (the anchor's direction swapped)",
        S + "consistency_terms.py",
        'first, second = (b, a) if self.kind == "reverse_kl" else (a, b)',
        'first, second = (a, b) if self.kind == "reverse_kl" else (b, a)',
        ("tests/test_reference_kl_regularizer.py", "tests/test_fused_reference_kl.py"),
    ),
    Mutant(
        "kl-sign",
        "the symmetric KL of log-probabilities has its sign flipped",
        S + "closed_forms.py",
        "return 0.5 * ops.sum(diff * (log_p - log_q), axis=axis)",
        "return 0.5 * ops.sum(diff * (log_q - log_p), axis=axis)",
        ("tests/test_divergences.py",),
    ),
    Mutant(
        "kl-grad",
        "the closed-form gradient of KL(p‖q) in q is q + p instead of q - p",
        S + "closed_forms.py",
        "            term_b = q - p\n",
        "            term_b = q + p\n",
        ("tests/test_divergences.py",),
    ),
    Mutant(
        "bernoulli-half",
        "the Bernoulli symmetric KL drops its factor 1/2",
        S + "divergences.py",
        "term = 0.5 * (p_ - q_) * (log_p - log_q)",
        "term = (p_ - q_) * (log_p - log_q)",
        ("tests/test_divergences.py",),
    ),
    Mutant(
        "consistency-ignores-weights",
        "the consistency term ignores `sample_weight` and the Keras mask",
        S + "consistency_terms.py",
        "a, b, sample_weight=position_weights(w, a)",
        "a, b, sample_weight=None",
        ("tests/test_rdrop_model.py", "tests/integration/test_unlabeled_rows.py"),
    ),
    Mutant(
        "consistency-reduction",
        "the consistency term is summed over the batch instead of averaged",
        S + "consistency_terms.py",
        'name=name or kind, reduction="mean_with_sample_weight", dtype="float32"',
        'name=name or kind, reduction="sum", dtype="float32"',
        ("tests/test_rdrop_model.py",),
    ),
    Mutant(
        "alpha-ignored",
        "alpha is not applied to the consistency term",
        S + "alpha_schedule.py",
        "        term = entry.alpha * value\n",
        "        term = value\n",
        # A classifier with a sparse cross-entropy takes the fused path; these
        # files train the general path too (fused against general).
        ("tests/test_fused_cross_entropy.py", "tests/test_alpha_conversions.py"),
    ),
    Mutant(
        "schedule-step-frozen",
        "a scheduled alpha's step counter never advances",
        S + "alpha_schedule.py",
        "    step_variable.assign_add(1)\n",
        "    step_variable.assign_add(0)\n",
        ("tests/test_alpha_schedule.py",),
    ),
    Mutant(
        "task-loss-one-pass",
        "the task loss is the first pass's only, not the mean of both",
        S + "step_paths.py",
        "step.task_loss_of(step.y_pred_1) + step.task_loss_of(step.y_pred_2)",
        "step.task_loss_of(step.y_pred_1) + step.task_loss_of(step.y_pred_1)",
        ("tests/test_fused_cross_entropy.py", "tests/test_alpha_conversions.py"),
    ),
    Mutant(
        "concat-split-same-half",
        "concat mode compares the first half with itself",
        S + "stacked_passes.py",
        "        seconds.append(second)\n",
        "        seconds.append(first)\n",
        ("tests/test_rdrop_model.py",),
    ),
    Mutant(
        "all-rows-ignored",
        "`consistency_on_all_rows=True` still weighs the KL by `sample_weight`",
        S + "rdrop_model.py",
        "consistency_weight=None if self.consistency_on_all_rows else sample_weight,",
        "consistency_weight=sample_weight,",
        ("tests/integration/test_unlabeled_rows.py",),
    ),
    Mutant(
        "fused-lm-not-taken",
        "the fused language-model path is silently never taken",
        S + "fused_cross_entropy.py",
        "        (entry,) = step.plan\n        return entry.alpha != 0\n",
        "        (entry,) = step.plan\n        return False\n",
        ("tests/test_fused_cross_entropy.py",),
    ),
    Mutant(
        "fused-ignore-class-dropped",
        "the fused path forgets the loss's `ignore_class`",
        S + "fused_step.py",
        '    ignore_class = loss_setting(loss, "ignore_class")\n',
        "    ignore_class = None\n",
        ("tests/test_fused_cross_entropy.py",),
    ),
    Mutant(
        "snapshot-is-live-model",
        "the reference reads the live weights instead of the snapshot",
        S + "reference_snapshot.py",
        "                return ref.value  # no cast op per weight and step",
        "                return variable.value  # no cast op per weight and step",
        ("tests/test_reference_kl_regularizer.py",),
    ),
    Mutant(
        "snapshot-without-bn-stats",
        "the snapshot leaves out BatchNormalization's moving statistics",
        S + "reference_snapshot.py",
        "if w.trainable or id(w) in assigned]",
        "if w.trainable]",
        ("tests/test_partial_snapshot.py",),
    ),
    Mutant(
        "reference-gradient-not-stopped",
        "the KL's backward pass computes a gradient for the constant reference",
        S + "closed_forms.py",
        '    if constant != "b":\n        if symmetric:',
        "    if True:\n        if symmetric:",
        ("tests/test_divergences.py",),
    ),
    Mutant(
        "beta-ignored",
        "the anchor's penalty is not multiplied by beta",
        S + "reference_penalty.py",
        "    return beta * total\n",
        "    return total\n",
        ("tests/test_reference_kl_regularizer.py",),
    ),
    Mutant(
        "adaptive-beta-wrong-sign",
        "the adaptive beta moves away from the target KL",
        S + "reference_penalty.py",
        "anchor.beta.assign(beta * (1.0 + error * step))",
        "anchor.beta.assign(beta * (1.0 - error * step))",
        ("tests/test_reference_kl_regularizer.py",),
    ),
    Mutant(
        "seed-state-not-saved",
        "the dropout seed states are not saved with the model",
        S + "seed_state.py",
        '        store[f"{KEY_PREFIX}{i}"] = keras.ops.convert_to_numpy('
        "variable.value)",
        "        pass",
        ("tests/integration/test_exact_resume.py",),
    ),
    Mutant(
        "torch-generator-not-restored",
        "a resumed torch run does not restore torch's CPU generator state",
        S + "seed_state.py",
        '        torch.random.set_rng_state(state("cpu"))\n',
        "        pass\n",
        ("tests/integration/test_exact_resume.py",),
    ),
    Mutant(
        "no-stochastic-check",
        "a model without dropout is taken as stochastic (no warning)",
        S + "model_checks.py",
        "            if rate and rate > 0:\n"
        "                return True\n"
        "            continue",
        "            return True",
        ("tests/test_rdrop_model.py",),
    ),
    Mutant(
        "label-check-off",
        "one-hot labels given to a sparse loss are not caught",
        S + "label_checks.py",
        "if loss_name in _SPARSE and same_rank and label_shape[-1] not in (1, None):",
        "if False:",
        ("tests/test_label_checks.py",),
    ),
    Mutant(
        "evaluate-keeps-own-logs",
        "`evaluate` reports R-Drop's own logs (kl_loss, task_loss)",
        S + "rdrop_model.py",
        "return {k: v for k, v in results.items() if k not in own}",
        "return dict(results)",
        ("tests/test_rdrop_model.py",),
    ),
    Mutant(
        "kl-log-unscaled-weight",
        "`kl_loss` is logged with alpha applied (weighted, not unweighted)",
        S + "rdrop_model.py",
        "unscale_for_distribution(consistency.unweighted),",
        "unscale_for_distribution(consistency.weighted),",
        ("tests/test_rdrop_model.py", "tests/test_alpha_schedule.py"),
    ),
    Mutant(
        "anchor-change-not-retraced",
        "a `fit` whose anchor settings changed reuses the step traced before",
        S + "rdrop_model.py",
        "            force = True\n            # JAX keeps",
        "            force = force\n            # JAX keeps",
        ("tests/test_reference_kl_regularizer.py",),
        # torch runs the step eagerly: only a traced step can be stale.
        backend="jax",
    ),
    Mutant(
        "ddp-shard-mixed-up",
        "every torch rank trains on rank 0's shard (test harness sharding)",
        "tests/distributed/torch_ddp.py",
        "    x, y = shard(x, rank, world), shard(y, rank, world)",
        "    x, y = shard(x, 0, world), shard(y, 0, world)",
        ("tests/test_torch_ddp.py",),
        backend="torch",
    ),
]


def copy_checkout(dest: Path) -> None:
    ignore = shutil.ignore_patterns(
        ".git", ".tox", "__pycache__", ".*_cache", "build", "dist", "*.egg-info"
    )
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def apply(tree: Path, mutant: Mutant) -> None:
    path = tree / mutant.file
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(
            f"mutant {mutant.name!r}: its text occurs {count} times in "
            f"{mutant.file} (exactly once is needed); update the mutant."
        )
    path.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")


def pytest(tree: Path, python: str, backend: str, tests) -> tuple[int, str]:
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        PYTHONPATH=str(tree),
        PYTHONHASHSEED="0",
        TF_CPP_MIN_LOG_LEVEL="2",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        command + list(tests),
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    return proc.returncode, proc.stdout + proc.stderr


def env_python(env_dir: Path, backend: str, env_names: dict) -> str:
    python = env_dir / env_names[backend] / "bin" / "python"
    if not python.exists():
        raise SystemExit(
            f"no interpreter at {python}: build the env first "
            f"(tox -e {env_names[backend]} -- --collect-only -q), or pass --env-dir"
        )
    return str(python)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutant names to run")
    parser.add_argument("--list", action="store_true", help="list the mutants")
    parser.add_argument("--full", action="store_true", help="run the whole suite")
    parser.add_argument("--env-dir", default=str(ROOT / ".tox"))
    parser.add_argument("--jax-env", default="jax", help="tox env for JAX mutants")
    parser.add_argument("--torch-env", default="torch", help="tox env for torch")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:32} {m.what}")
        return 0
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants: {sorted(unknown)}; see --list")
    names = {"jax": args.jax_env, "torch": args.torch_env}
    env_dir = Path(args.env_dir)
    rows, survivors = [], 0
    with tempfile.TemporaryDirectory() as scratch:
        clean = Path(scratch) / "clean"
        copy_checkout(clean)
        # The owning tests pass on the unmutated code, once per backend.
        for backend in sorted({m.backend for m in chosen}):
            tests = sorted({t for m in chosen if m.backend == backend for t in m.tests})
            python = env_python(env_dir, backend, names)
            selected = () if args.full else tests
            code, output = pytest(clean, python, backend, selected)
            if code != 0:
                sys.stderr.write(output[-6000:])
                raise SystemExit(f"the unmutated suite fails on {backend}")
            print(f"unmutated: {len(tests)} files pass on {backend}", file=sys.stderr)
        for i, mutant in enumerate(chosen, 1):
            tree = Path(scratch) / mutant.name
            copy_checkout(tree)
            apply(tree, mutant)
            python = env_python(env_dir, mutant.backend, names)
            tests = () if args.full else mutant.tests
            start = time.perf_counter()
            code, output = pytest(tree, python, mutant.backend, tests)
            seconds = time.perf_counter() - start
            failed = [line for line in output.splitlines() if line.startswith("FAILED")]
            by = failed[0].split(" ")[1].split(" - ")[0] if failed else "(pytest error)"
            if code == 0:
                survivors += 1
                by = "SURVIVED"
                sys.stderr.write(f"--- {mutant.name} survived:\n{output[-3000:]}\n")
            rows.append((mutant, by, seconds))
            print(
                f"[{i}/{len(chosen)}] {mutant.name}: "
                f"{'SURVIVED' if code == 0 else 'killed'} ({seconds:.0f} s)",
                file=sys.stderr,
            )
            shutil.rmtree(tree, ignore_errors=True)
    print("| mutant | the bug | backend | killed by | s |")
    print("|---|---|---|---|---|")
    for mutant, by, seconds in rows:
        print(
            f"| {mutant.name} | {mutant.what} | {mutant.backend} | `{by}` "
            f"| {seconds:.0f} |"
        )
    print(f"\n{len(rows) - survivors}/{len(rows)} killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
