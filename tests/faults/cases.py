"""The fault corpus as data: each row is one bad input or fault, the real `zoo` command
line that meets it, the exit status and the one line it must print.

Placeholders in argv: {fx} the shared inputs (good models), {bad} hostile checkpoints,
{r} recipes, {k} key files, {tmp} the case's own folder (the working directory, holding
the registry), {hub} a `zoo serve` on loopback, {dead} a port nobody listens on,
{silent} a port that accepts and never answers.

After every case: the registry dump and its blobs are unchanged, nothing new is left in
the case's folder (no temp file or hidden `.NAME.PID.writing` folder), and `zoo verify`
is clean."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    exit: int  # 1: one line "error: ..."; 2: click's usage, its "Error:" line matched
    pattern: str  # a regex the one message line must match
    setup: str = "seeded"  # "seeded": the world's registry; "empty": an empty folder
    env: dict[str, str] = field(default_factory=dict)
    report: bool = False  # a check report: exit 1, the finding on stdout, stderr empty
    xfail: str = ""  # a real bug this case found: the reason, strict

    @property
    def command(self) -> str:
        return self.argv[0] if self.argv[0] not in ("--registry",) else self.argv[2]


def c(id: str, args: str | list[str], exit: int, pattern: str, **kw) -> Case:
    return Case(id, tuple(shlex.split(args) if isinstance(args, str) else args), exit, pattern, **kw)


NO_REG = r"no registry at"
# click's usage errors: what is missing, unknown, extra or not a value
USAGE = (r"^Error: (Missing (option|argument) |No such (option|command)|Got unexpected extra argument|"
         r"Invalid value for |Option '--\w+' does not take a value)")

CASES: list[Case] = [
    # --- no registry at all: every reading command says so and creates nothing
    *[c(f"no-registry-{'-'.join(cmd.split()[:2 if cmd.startswith('key') else 1])}", cmd, 1, NO_REG, setup="empty")
      for cmd in (
        "list", "show base", "lineage base", "verify", "export base out", "tag base x", "rm base", "tasks",
        "eval base", "gc", "check base", "key export locked", "key import {k}/wrong.key",
        "push base team/x --endpoint {dead}")],
    *[c(f"no-registry-{cmd.split()[0]}", cmd, 1, pattern, setup="empty") for cmd, pattern in (
        ("merge --method ties --base base e --out m", r"'base' is neither a registered model nor a path"),
        ("protect base --out p", r"'base' is neither a registered model nor a path"),
        ("unlock locked --out u", r"'locked' is neither a registered model nor a path"),
        ("add {fx}/parity --name p --base base", r"no model named 'base'"))],
    c("registry-flag-missing-file", "--registry {tmp}/other.db list", 1, NO_REG),
    c("registry-is-a-folder", "--registry {fx} list", 1, r"is a folder; the registry is a file in it"),
    c("registry-is-text", "--registry {bad}/text.txt list", 1, r"is not a zoo registry"),
    c("registry-is-safetensors", "--registry {bad}/empty.safetensors show base", 1, r"is not a zoo registry"),

    # --- add: paths
    c("add-nonexistent", "add {tmp}/nope --name x --kind base", 1, r"no such file"),
    c("add-empty-dir", "add {bad}/emptydir --name x --kind base", 1, r"no checkpoint found"),
    c("add-notes-dir", "add {bad}/notes --name x --kind base", 1, r"no checkpoint found"),
    c("add-text-file", "add {bad}/text.txt --name x --kind base", 1, r"not a checkpoint; expected a \.safetensors fil"),
    c("add-symlink-loop", "add {bad}/loop --name x --kind base", 1, r"symbolic link that cannot be followed"),
    c("add-dangling-symlink", "add {bad}/dangling --name x --kind base", 1, r"a symbolic link that cannot be followed \(a lo"),
    c("add-pickle-dir", "add {bad}/pickle --name x --kind base", 1, r"never unpickles"),
    c("add-pickle-file", "add {bad}/ckpt.pt --name x --kind base", 1, r"is a pickle checkpoint; zoo never unpickles files"),
    # --- add: hostile safetensors
    c("add-truncated", "add {fx}/trunc --name x --base base", 1, r"truncated"),
    c("add-truncated-header", "add {fx}/trunc-header --name x --base base", 1, r"corrupt safetensors header: it claims 4176 he"),
    c("add-corrupt-header", "add {fx}/corrupt --name x --base base", 1, r"corrupt safetensors header"),
    c("add-absurd-header-length", "add {fx}/absurd --name x --base base", 1, r"claims"),
    c("add-huge-header-claim", "add {fx}/huge-claim --name x --base base", 1, r"claims"),
    c("add-seven-bytes", "add {fx}/seven-bytes --name x --base base", 1, r"truncated safetensors file \(7 bytes, no heade"),
    c("add-zero-bytes", "add {fx}/zero-bytes --name x --base base", 1, r"truncated safetensors file \(0 bytes, no heade"),
    c("add-nonjson-header", "add {bad}/nonjson.safetensors --name x --kind base", 1, r"corrupt safetensors header \(not valid JSON\)"),
    c("add-list-header", "add {bad}/list.safetensors --name x --kind base", 1, r"corrupt safetensors header \(not a JSON object"),
    c("add-non-utf8-header", "add {bad}/utf8.safetensors --name x --kind base", 1, r"corrupt safetensors header \(not valid JSON\)"),
    c("add-header-claims-more", "add {bad}/claims-more.safetensors --name x --kind base", 1, r"corrupt safetensors header: it claims 1048576"),
    c("add-unknown-dtype", "add {bad}/dtype.safetensors --name x --kind base", 1, r"Q7"),
    c("add-overlapping", "add {bad}/overlap.safetensors --name x --kind base", 1, r"share bytes"),
    c("add-offsets-past-end", "add {bad}/past-end.safetensors --name x --kind base", 1, r"tensor 'a' claims 1073741824 bytes but F32\[4\]"),
    c("add-negative-offsets", "add {bad}/negative.safetensors --name x --kind base", 1, r"corrupt safetensors header entry for tensor '"),
    c("add-reversed-offsets", "add {bad}/reversed.safetensors --name x --kind base", 1, r"corrupt safetensors header entry for tensor '"),
    c("add-shape-vs-bytes", "add {bad}/shape.safetensors --name x --kind base", 1, r"tensor 'a' claims 16 bytes but F32\[5\] needs 2"),
    c("add-negative-shape", "add {bad}/neg-shape.safetensors --name x --kind base", 1, r"corrupt safetensors header entry for tensor '"),
    c("add-no-offsets", "add {bad}/no-offsets.safetensors --name x --kind base", 1, r"corrupt safetensors header entry for tensor '"),
    c("add-no-tensors", "add {bad}/empty.safetensors --name x --kind base", 1, r"holds no tensors"),
    c("add-bad-config", "add {bad}/bad-config --name x --base base", 1, r"config"),
    # --- add: names, kinds, bases
    *[c(f"add-name-{i}", ["add", "{fx}/mod3", "--name", name, "--base", "base"], 1, r"name")
      for i, name in enumerate(["a/b", "..", "../x", "a\\b", "bad\x07name", "tab\tname", "-flag", "", "x" * 300,
                                "new\nline", "sp ace", "café", "a@1", "."])],
    c("add-duplicate-name", "add {fx}/mod3 --name parity --base base", 1, r"already exists.*--new-version"),
    c("add-unknown-base", "add {fx}/mod3 --name m --base nobase", 1, r"no model named 'nobase'"),
    c("add-base-version-missing", "add {fx}/mod3 --name m --base base@9", 1, r"base@9|version"),
    c("add-wide-expert", "add {fx}/wide --name w --base base", 1, r"does not match base base@1"),
    c("add-unknown-kind", "add {fx}/mod3 --name m --kind weird", 1, r"kind"),
    c("add-expert-without-base", "add {fx}/mod3 --name m --kind expert", 1, r"base"),
    c("add-adapter-on-vit", "add {fx}/ad --name a --kind adapter --base base", 1, r"a does not match base base@1: 4 missing tenso"),
    c("add-adapter-bad-shape", "add {fx}/ad-bad --name a --kind adapter --base lb", 1, r"a does not match base lb@1: 4 adapter mismatc"),
    c("add-new-version-other-arch", "add {fx}/lb --name base --kind base --new-version", 1,
      r"a new version must be the same architecture"),
    c("add-bad-tag", ["add", "{fx}/mod3", "--name", "m", "--base", "base", "--tag", "bad\ntag"], 1, r"tag"),
    c("add-missing-name", "add {fx}/mod3", 2, USAGE),
    c("add-unknown-option", "add {fx}/mod3 --name m --frobnicate", 2, USAGE),

    # --- check
    c("check-nonexistent", "check ghost --base base", 1, r"ghost"),
    c("check-wide", "check {fx}/wide --base base", 1, r"shape", report=True),
    c("check-nan", "check {fx}/nan --base base", 1, r"non-finite|NaN|nan", report=True),
    c("check-corrupt", "check {fx}/corrupt --base base", 1, r"corrupt safetensors header"),
    c("check-adapter-as-base", "check lb --base ad", 1, r"ad is a LoRA adapter, not a base model", report=True),
    c("check-no-args", "check", 2, USAGE),
    c("check-loop", "check {bad}/loop --base base", 1, r"symbolic link"),
    # --- list, show, lineage, tasks, verify
    c("list-unknown-kind", "list --kind weird", 1, r"unknown kind"),
    c("list-unknown-base", "list --base ghost", 1, r"ghost"),
    c("show-nothing", "show nothing", 1, r"no model named"),
    c("show-bad-version", "show parity@9", 1, r"parity@9|version"),
    c("show-version-not-number", "show parity@x", 1, r"bad version in 'parity@x': expected NAME@N wi"),
    c("show-path-name", "show ../../etc/passwd", 1, r"model name '\.\./\.\./etc/passwd' contains a path"),
    c("show-control-char", ["show", "a\x1bb"], 1, r"model name 'a\\x1bb' contains control characte"),
    c("show-no-arg", "show", 2, USAGE),
    c("lineage-nothing", "lineage nothing", 1, r"no model named"),
    c("lineage-bad-version", "lineage base@0", 1, r"no model named 'base@0' in"),
    c("verify-nothing", "verify nothing", 1, r"no model named"),
    c("tasks-extra-arg", "tasks x", 2, USAGE),
    # --- export, tag, rm
    c("export-not-empty", "export parity {fx}/base", 1, r"not empty"),
    c("export-nothing", "export nothing {tmp}/out", 1, r"no model named"),
    c("export-into-a-file", "export parity {bad}/text.txt", 1, r"text.txt already exists and is not empty; choose a new folder"),
    c("export-under-a-file", "export parity {bad}/text.txt/sub", 1, r"text\.txt.*not a (folder|directory)"),
    c("export-missing-dir-arg", "export parity", 2, USAGE),
    c("tag-nothing", "tag nothing x", 1, r"no model named"),
    c("tag-bad-tag", ["tag", "parity", "bad\ntag"], 1, r"tag"),
    c("rm-used", "rm base", 1, r"used by .*--force"),
    c("rm-nothing", "rm nothing", 1, r"no model named"),
    c("rm-bad-version", "rm parity@5", 1, r"no model named 'parity@5' in"),
    # --- eval
    c("eval-no-tasks", "eval base", 1, r"has no tasks"),
    c("eval-no-data", "eval mod3", 1, r"task 'mod3' has no data"),
    c("eval-unknown-task", "eval parity --task ghost", 1, r"ghost"),
    c("eval-unknown-split", "eval parity --split nope", 1, r"nope"),
    c("eval-nothing", "eval nothing", 1, r"no model named"),
    c("eval-adapter", "eval ad --task parity", 1, r"ad@1: transformers cannot read its config\.jso"),
    c("eval-wrong-labels", "eval mod3 --task parity", 1, r"mod3@1 predicts 3 labels but task 'parity' ha"),
    # --- gc
    c("gc-negative-age", "gc --older-than -5", 1, r"--older-than -5 is not an age"),
    c("gc-not-a-number", "gc --older-than soon", 2, USAGE),
    c("gc-nan", "gc --older-than nan", 1, r"--older-than nan is not an age; give seconds,"),

    # --- merge: flags
    c("merge-nothing", "merge", 1, r"give a recipe file, or --method with --base a"),
    c("merge-no-out", "merge --method ties --base base parity mod3", 1, r"out"),
    c("merge-both-outs", "merge --method ties --base base parity mod3 --out m --out-dir {tmp}/d", 1, r"out"),
    c("merge-unknown-method", "merge --method frankenmerge --base base parity --out m", 1, r"frankenmerge"),
    c("merge-no-base", "merge --method ties parity mod3 --out m", 1, r"base"),
    c("merge-no-models", "merge --method ties --base base --out m", 1, r"the recipe names no models to merge"),
    c("merge-ghost-model", "merge --method ties --base base ghost --out m", 1, r"ghost"),
    c("merge-ghost-base", "merge --method ties --base ghost parity --out m", 1, r"ghost"),
    c("merge-wide", "merge --method task_arithmetic --base base {fx}/wide --out m", 1, r"38 shape mismatches \(e\.g\. vit\.embeddings\.cls_"),
    c("merge-nan-input", "merge --method task_arithmetic --base base {fx}/nan --out m", 1, r"non-finite|NaN|nan"),
    c("merge-inf-input", "merge --method task_arithmetic --base base {fx}/inf --out m", 1, r"non-finite|inf"),
    c("merge-corrupt-input", "merge --method task_arithmetic --base base {fx}/corrupt --out m", 1, r"corrupt"),
    c("merge-loop-input", "merge --method task_arithmetic --base base {bad}/loop --out m", 1, r"symbolic link"),
    c("merge-nan-head", "merge --method task_arithmetic --base base {fx}/nan-head -p weight=0.3 --out m", 1, r"classifier.bias"),
    c("merge-adapter-as-base", "merge --method task_arithmetic --base ad parity --out m", 1, r"adapter"),
    c("merge-out-exists", "merge --method task_arithmetic --base base parity --out mod3", 1, r"already exists"),
    c("merge-out-bad-name", "merge --method task_arithmetic --base base parity --out a/b", 1, r"name"),
    c("merge-out-dir-not-empty", "merge --method task_arithmetic --base base parity --out-dir {fx}/base", 1,
      r"not empty|exists"),
    c("merge-out-dir-under-file", "merge --method task_arithmetic --base base parity --out-dir {bad}/text.txt/d",
      1, r"text\.txt.*not a (folder|directory)"),
    c("merge-param-unknown", "merge --method ties --base base parity mod3 -p wibble=1 --out m", 1, r"wibble"),
    c("merge-param-no-equals", "merge --method ties --base base parity mod3 -p density --out m", 1, r"density"),
    c("merge-param-string", "merge --method ties --base base parity mod3 -p density=lots --out m", 1, r"density"),
    c("merge-param-nan", "merge --method ties --base base parity mod3 -p density=nan --out m", 1, r"density"),
    c("merge-param-inf", "merge --method task_arithmetic --base base parity -p lambda=inf --out m", 1, r"lambda"),
    c("merge-density-high", "merge --method ties --base base parity mod3 -p density=2 --out m", 1, r"density"),
    c("merge-density-negative", "merge --method ties --base base parity mod3 -p density=-1 --out m", 1,
      r"density"),
    c("merge-slerp-t", "merge --method slerp --base base parity -p t=5 --out m", 1, r"\bt\b"),
    c("merge-slerp-three", "merge --method slerp --base base parity mod3 --out m", 1, r"slerp takes at most 1 model\(s\) besides the ba"),
    c("merge-bad-dtype", "merge --method ties --base base parity mod3 --dtype float7 --out m", 1, r"float7"),
    c("merge-bad-out-dtype", "merge --method ties --base base parity mod3 --out-dtype int3 --out m", 1, r"int3"),
    c("merge-bad-device", "merge --method ties --base base parity mod3 -p weight=0.3 --device tpu --out m", 1, r"tpu"),
    c("merge-shard-zero", "merge --method ties --base base parity mod3 --shard-size 0 --out m", 1, r"shard"),
    c("merge-shard-negative", "merge --method ties --base base parity mod3 --shard-size -1 --out m", 1, r"shard"),
    c("merge-seed-text", "merge --method ties --base base parity mod3 --seed x --out m", 2, USAGE),
    c("merge-steps-data-free", "merge --method ties --base base parity --steps 5 --out m", 1,
      r"ties does not train"),
    c("merge-lr-data-free", "merge --method ties --base base parity --lr 0.1 --out m", 1, r"does not train"),
    c("merge-steps-negative", "merge --method adamerging --base base parity mod3 --steps -3 --out m", 1,
      r"steps"),
    c("merge-lr-nan", "merge --method adamerging --base base parity mod3 --lr nan --out m", 1, r"lr|rate"),
    c("merge-learned-no-data", "merge --method adamerging --base base parity mod3 --out m", 1, r"mod3|data"),
    c("merge-protected-and-fails", "merge --method task_arithmetic --base base locked --out mod3", 1,
      r"already exists"),
    # --- merge: recipes of every kind
    *[c(f"recipe-{name}", f"merge {{r}}/{name}.yml --out m", 1, pattern, xfail=bug) for name, pattern, bug in ((*x, "")[:3] for x in (
        ("no-method", r"merge_method"), ("no-models", r"models"), ("no-base", r"base"),
        ("unknown-method", r"frankenmerge"), ("method-number", r"42|merge_method"),
        ("models-string", r"models must be a list of \{model: NAME\} entries, got 'parity'"),
        ("models-dict", r"models must be a list"), ("model-missing", r"model"), ("model-number", r"17|model"),
        ("nonexistent", r"ghost"), ("bad-version", r"parity@9|version"), ("unknown-param", r"wibble"),
        ("param-string", r"lambda"), ("param-nan", r"lambda"), ("param-inf", r"lambda"),
        ("weight-nan", r"weight"), ("weight-list", r"weight"), ("density-high", r"density"),
        ("density-neg", r"density"), ("density-zero", r"density"), ("slerp-t", r"\bt\b"), ("slerp-two", r"slerp takes at most 1 model\(s\) besides the ba"),
        ("dtype", r"float7"), ("top-list", r"a recipe must be a YAML mapping"), ("top-scalar", r"a\ recipe\ must\ be\ a\ YAML\ mapping"), ("empty", r"a recipe must be a YAML mapping"), ("not-yaml", r"YAML|yaml"),
        ("tabs", r"not valid YAML \(while scanning for the next t"), ("unknown-key", r"frobnicate"), ("base-missing-model", r"ghost"),
        ("escape", r"\.\./|no model|no such"), ("abs-path", r"/etc"), ("wide", r"38 shape mismatches \(e\.g\. vit\.embeddings\.cls_"), ("adapter-base", r"adapter"),
        ("python-tag", r"not valid YAML \(could not determine a constru"), ("anchors", r"\bx\b|\by\b|unknown"), ("bomb", r"unknown recipe field\(s\): a, b, c, d, e, f, g,"), ("dup-keys", r"gives 'merge_method' twice"),
        ("bad-slices", r"slice 0 needs sources"), ("latin1", r"is not UTF-8 text \(byte 19\)"), ("nul", r"not valid YAML \(unacceptable character #x0000"),
        ("huge", r"ties needs a base model"), ("dir", r"cannot\ read\ recipe")))],
    c("recipe-file-missing", "merge {tmp}/nope.yml --out m", 1, r"nope\.yml"),
    c("recipe-and-method", "merge {r}/ok.yml --method ties --out m", 1, r"ties needs a base model \(base_model / --base\)"),

    # --- protect
    c("protect-nothing", "protect nothing --out p", 1, r"'nothing' is neither a registered model nor a path"),
    c("protect-no-out", "protect parity", 1, r"out"),
    c("protect-both-outs", "protect parity --out p --out-dir {tmp}/d", 1, r"out"),
    c("protect-adapter", "protect ad --out p", 1, r"ad@1 is a LoRA adapter: MergeLock protects whole models"),
    c("protect-protected", "protect locked --out p", 1, r"protected|already"),
    c("protect-out-exists", "protect parity --out mod3", 1, r"already exists"),
    c("protect-out-bad-name", "protect parity --out ../p", 1, r"name"),
    c("protect-nan", "protect {fx}/nan --out-dir {tmp}/d", 1, r"non-finite|NaN|nan"),
    c("protect-inf", "protect {fx}/inf --out-dir {tmp}/d", 1, r"non-finite|inf"),
    c("protect-corrupt", "protect {fx}/corrupt --out-dir {tmp}/d", 1, r"corrupt"),
    c("protect-max-cond-low", "protect parity --out p --max-cond 0.5", 1, r"max-cond|condition"),
    c("protect-max-cond-nan", "protect parity --out p --max-cond nan", 1, r"max-cond|condition"),
    c("protect-seed-negative", "protect parity --out p --seed -1", 1, r"seed"),
    c("protect-key-file-exists", "protect parity --out p --key-file {k}/wrong.key", 1, r"already exists"),
    c("protect-key-file-under-file", "protect parity --out p --key-file {bad}/text.txt/k.key", 1, r"key"),
    c("protect-out-dir-not-empty", "protect parity --out-dir {fx}/base", 1, r"not empty|exists"),
    c("protect-shard-zero", "protect parity --out p --shard-size 0", 1, r"shard"),
    # --- unlock: wrong keys on every route
    c("unlock-wrong-key-registered", "unlock locked --key {k}/wrong.key --out u", 1, r"key"),
    c("unlock-wrong-key-folder", "unlock {fx}/locked-dir --key {k}/wrong.key --out-dir {tmp}/u", 1, r"key"),
    c("unlock-folder-without-key", "unlock {fx}/locked-dir --out-dir {tmp}/u", 1, r"key"),
    c("unlock-garbage-key", "unlock locked --key {k}/garbage.key --out u", 1, r"is not a zoo key file"),
    c("unlock-empty-key", "unlock locked --key {k}/empty.key --out u", 1, r"is not a zoo key file"),
    c("unlock-list-key", "unlock locked --key {k}/list.key --out u", 1, r"is not a zoo key file"),
    c("unlock-other-format-key", "unlock locked --key {k}/other-format.key --out u", 1, r"is not a zoo key file"),
    c("unlock-tampered-key", "unlock locked --key {k}/tampered.key --out u", 1, r"altered|does not match"),
    c("unlock-missing-key-file", "unlock locked --key {tmp}/none.key --out u", 1, r"no key file"),
    c("unlock-not-protected", "unlock parity --out u", 1, r"is not protected"),
    c("unlock-folder-not-protected", "unlock {fx}/parity --key {fx}/locked-dir.key --out-dir {tmp}/u", 1,
      r"is not protected"),
    c("unlock-nothing", "unlock nothing --out u", 1, r"'nothing' is neither a registered model nor a path"),
    c("unlock-out-exists", "unlock locked --out mod3", 1, r"already exists"),
    c("unlock-folder-key-on-registered", "unlock locked --key {fx}/locked-dir.key --out u", 1, r"key"),
    c("unlock-bad-kind", "unlock locked --out u --kind weird", 1, r"kind"),
    # --- key export / import
    c("key-export-nothing", "key export nothing", 1, r"no model named"),
    c("key-export-not-protected", "key export parity", 1, r"no key|protected"),
    c("key-export-exists", "key export locked --out {k}/wrong.key", 1, r"already exists"),
    c("key-export-under-file", "key export locked --out {bad}/text.txt/x.key", 1, r"cannot write the key file"),
    c("key-import-wrong", "key import {k}/wrong.key", 1, r"does not belong|does not match|key"),
    c("key-import-garbage", "key import {k}/garbage.key", 1, r"is not a zoo key file"),
    c("key-import-missing", "key import {tmp}/none.key", 1, r"no key file"),
    c("key-import-tampered", "key import {k}/tampered.key", 1, r"altered"),
    c("key-import-to-unprotected", "key import {fx}/locked-dir.key --model parity", 1, r"protected"),
    c("key-import-to-nothing", "key import {fx}/locked-dir.key --model nothing", 1, r"no model named"),
    c("key-import-folder-key-on-registered", "key import {fx}/locked-dir.key --model locked", 1,
      r"does not belong|does not match"),

    # --- token, serve
    c("token-create-bad-user", "token create --user a/b", 1, r"invalid user name 'a/b'"),
    c("token-create-bad-scope", "token create --user bob --scope admin", 1, r"unknown scope 'admin'"),
    c("token-revoke-unknown", "token revoke tok_nope", 1, r"no token 'tok_nope'.*zoo token list"),
    c("token-list-unknown-user", "token list --user ghost", 1, r"no user named 'ghost'"),
    c("org-add-unknown-member", "org add team --member ghost", 1, r"no user named 'ghost'"),
    c("org-add-member-unknown-org", "org add-member nope ghost", 1, r"no organisation named 'nope'"),
    c("org-remove-member-unknown-org", "org remove-member nope ghost", 1, r"no organisation named 'nope'"),
    c("user-add-bad-name", "user add .hidden", 1, r"invalid user name '.hidden'"),
    c("serve-bad-port", "serve --port 99999", 1, r"--port 99999 is not a port"),
    c("serve-negative-port", "serve --port -1", 1, r"port"),
    c("serve-bad-host", "serve --host 256.1.1.1 --port 0", 1, r"--host '256.1.1.1' is not an address"),
    c("serve-name-host", "serve --host no.such.host.invalid --port 0", 1, r"--host"),
    c("serve-bad-threshold", "serve --port 0 --lfs-threshold -1", 1, r"lfs-threshold|threshold"),
    c("serve-port-text", "serve --port http", 2, USAGE),
    # --- pull / push without a reachable Hub
    c("pull-unreachable", "pull team/x --endpoint {dead}", 1, r"cannot reach"),
    c("pull-silent", "pull team/x --endpoint {silent}", 1, r"did not answer in time"),
    c("pull-bad-endpoint", "pull team/x --endpoint not-a-url", 1, r"connection to not-a-url failed: Request URL i"),
    c("pull-bad-repo-id", "pull ../../etc --endpoint {hub}", 1, r"invalid repository id|repo"),
    c("pull-missing-repo", "pull team/never --endpoint {hub}", 1, r"team/never|not found"),
    c("pull-into-empty-unreachable", "pull team/x --endpoint {dead}", 1, r"cannot reach", setup="empty"),
    c("push-unreachable", "push parity team/x --endpoint {dead}", 1, r"cannot reach"),
    c("push-silent", "push parity team/x --endpoint {silent}", 1, r"did not answer in time"),
    c("push-bad-repo-id", "push parity a/b/c --endpoint {hub}", 1, r"invalid repository id|repo"),
    c("push-nothing", "push nothing team/x --endpoint {hub}", 1, r"no model named"),
    c("push-no-token", "push parity team/x --endpoint {hub}", 1, r"token|401|auth"),
    c("push-wrong-token", "push parity team/x --endpoint {hub}", 1, r"token|401|auth", env={"HF_TOKEN": "zoo_wrong"}),
    c("push-read-token", "push parity team/x --endpoint {hub}", 1, r"token of reader .* is read-only",
      env={"HF_TOKEN": "{read}"}),
    c("push-other-namespace", "push parity bob/x --endpoint {hub}", 1,
      r"alice may not push to bob/x .*: bob is neither alice's namespace nor one of its organisations",
      env={"HF_TOKEN": "{write}"}),
    c("push-reserved-name", "push parity team/tree --endpoint {hub}", 1, r"'tree' is a reserved word",
      env={"HF_TOKEN": "{write}"}),
    c("push-bad-name-chars", "push parity team/a..b --endpoint {hub}", 1, r"invalid repository id 'team/a\.\.b'",
      env={"HF_TOKEN": "{write}"}),
    # --- demo: bad flags only
    c("demo-unknown-flag", "demo --turbo", 2, USAGE),
    c("demo-value-to-flag", "demo --quick=yes", 2, USAGE),
    c("init-extra-arg", "init extra", 2, USAGE),
    c("unknown-command", "frobnicate", 2, USAGE),
]
