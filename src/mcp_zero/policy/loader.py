"""Turn Cedar policy files into one validated, pre-parsed policy set.

Each file is parsed and validated against the schema on its own, so an error
names its file; the policies of all files are then joined into one
``cedarpy.PolicySet`` under ids of our own (``mcp0-<n>``: Cedar escapes quotes and
backslashes of an id in its diagnostics), mapped back to their ``@id`` (or
``<file>#<n>`` when they have none) by ``CompiledPolicies.by_cedar_id``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Literal, TypeVar

import cedarpy
from cedarpy import pst

from mcp_zero.errors import PolicyError
from mcp_zero.fdio import read_regular
from mcp_zero.policy.decision import DEFAULT_DENY
from mcp_zero.policy.detectors import LABELS
from mcp_zero.policy.stack import start_thread

POLICY_GLOB = "*.cedar"
_POSITIONAL_ID = re.compile(r"policy(\d+)")
_FOR_POLICY = re.compile(r"^for policy `[^`]*`, ")


@dataclass(frozen=True, slots=True)
class TargetScope:
    """A principal or resource scope of a policy, reduced to what denial messages need.

    ``entity_type`` None means any type; ``entity`` None means any entity; ``within`` is
    True for ``in``, where the entity or its plugin may match.
    """

    entity_type: str | None = None
    entity: tuple[str, str] | None = None
    within: bool = False

    def matches(self, etype: str, eid: str, parent: tuple[str, str] | None) -> bool:
        """Whether an entity of that type and id (and parent) can fall in this scope."""
        if self.entity_type is not None and self.entity_type != etype:
            return False
        if self.entity is None or self.entity == (etype, eid):
            return True
        return self.within and parent == self.entity


ANY_SCOPE = TargetScope()


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """What MCP-ZERO knows about one loaded policy, for decisions and denial messages."""

    id: str
    effect: Literal["permit", "forbid"]
    reason: str | None
    file: str
    line: int | None
    # Action ids the policy's scope names; None when it covers every action.
    verbs: frozenset[str] | None
    principal: TargetScope
    resource: TargetScope
    # The labels a ``@redact`` obligation names: an allow it takes part in has them redacted
    # from the action's result.
    redact: frozenset[str] = frozenset()
    # Its conditions read ``context.labels`` (or the whole context).
    reads_labels: bool = False
    # An ``@audit("before")`` obligation: an action it allows is recorded before it runs.
    audit_before: bool = False

    def covers(
        self, agent: str, verb: str, rtype: str, rid: str, parent: tuple[str, str] | None
    ) -> bool:
        """Whether the policy's scope (not its conditions) includes this request."""
        return (
            (self.verbs is None or verb in self.verbs)
            and self.principal.matches("Agent", agent, None)
            and self.resource.matches(rtype, rid, parent)
        )


@dataclass(frozen=True, slots=True)
class CompiledPolicies:
    """A validated policy set, ready for ``cedarpy.is_authorized``."""

    policy_set: cedarpy.PolicySet
    infos: Mapping[str, PolicyInfo]
    # The policy of each id Cedar knows (its diagnostics name these): ids of our own, as
    # Cedar escapes an @id with a quote or backslash in its error texts, and a backtick
    # ends the id there (a forbid that failed to evaluate went unrecognised: found by review)
    by_cedar_id: Mapping[str, PolicyInfo]
    sources: Mapping[str, str]
    # sha256 over file names and contents: which policy set decided, for audit records.
    digest: str


def policy_files(policy_dir: Path) -> list[Path]:
    """The ``*.cedar`` files of ``policy_dir`` that are policies, sorted by name.

    Hidden names are not: editors and systems leave them beside the files they
    belong to (Emacs's lock ``.#default.cedar``, a dangling symlink while the file
    is being edited; macOS's ``._default.cedar`` on foreign file systems). None in a
    missing directory; raises OSError for one that cannot be read (Path.glob saw none
    there, and an unreadable policy directory was reported "ok: 0 policies").
    """
    try:
        names = os.listdir(policy_dir)
    except FileNotFoundError:
        return []
    return sorted(policy_dir / name for name in names if _is_policy_name(name))


def _is_policy_name(name: str) -> bool:
    return fnmatch.fnmatchcase(name, POLICY_GLOB) and not name.startswith(".")


def _refuse_misplaced_policies(policy_dir: Path) -> None:
    """Raise PolicyError for the first entry of ``policy_dir`` that looks like a policy but
    would not be read: a ``.CEDAR`` name in another case, or a subdirectory holding a
    ``.cedar`` file (a forbid filed in ``team/`` was silently not in force: found by review).
    Raises OSError when ``policy_dir`` cannot be read."""
    with os.scandir(policy_dir) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        name = entry.name
        if name.startswith(".") or _is_policy_name(name):
            continue
        if _is_policy_name(name.lower()):
            shown = _shown(name)
            raise PolicyError(
                f'{shown}: a policy file\'s name must end in ".cedar", in lower case; rename it',
                data={"file": shown},
            )
        if entry.is_dir():
            try:
                inside = sorted(n for n in os.listdir(entry.path) if _is_policy_name(n.lower()))
            except OSError:
                continue  # nothing to tell of a directory no one can list
            if inside:
                misplaced = _shown(f"{name}/{inside[0]}")
                raise PolicyError(
                    f"{misplaced}: policies are read from {policy_dir} itself, not from its "
                    "subdirectories; move the file up, or the directory out of it",
                    data={"file": misplaced},
                )


def _shown(name: str) -> str:
    """A file name as text for messages and records, its bytes that are not UTF-8 escaped."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def read_policy_dir(policy_dir: Path) -> dict[str, str]:
    """Every policy file of ``policy_dir`` (see :func:`policy_files`) by file name
    (UTF-8, a leading BOM dropped).

    Raises PolicyError when the directory is missing or a file cannot be read (a
    dangling symlink among them too: it may be a policy the operator meant), or a
    policy is filed where it would not be read (see :func:`_refuse_misplaced_policies`).
    """
    if not policy_dir.is_dir():
        raise PolicyError(
            f"policy directory {policy_dir} does not exist; create it, "
            "or let mcp0 write the default policy there"
        )
    sources: dict[str, str] = {}
    try:
        paths = policy_files(policy_dir)
        _refuse_misplaced_policies(policy_dir)
    except OSError as exc:
        raise PolicyError(
            f"cannot read policy directory {policy_dir}: {exc.strerror or exc}"
        ) from exc
    for path in paths:
        name = path.name
        try:
            # (a name is text in records and messages: one that is not UTF-8 could not be
            # recorded, and crashed the load: found by review)
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = _shown(name)
            raise PolicyError(
                f"{shown}: a policy file's name must be UTF-8; rename it", data={"file": shown}
            ) from None
        try:
            # Not read blocking: a named pipe there hung every load, and the server's
            # watcher with it; a link to /dev/zero read without end (found by review).
            # utf-8-sig: a byte-order mark, as editors on Windows write, is not Cedar.
            sources[name] = read_regular(path).decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(
                f"{name}: cannot read policy file: {exc}", data={"file": name}
            ) from exc
    return sources


# Cedar (cedarpy's Rust) parses, validates and converts an expression recursively, on the
# calling thread's stack: a policy nested ~600 parentheses deep, or an `||` chain of ~1,500
# alternatives, overflowed the main thread's 8 MiB and the process died (SIGSEGV) at every
# load, `mcp0 policy check` included (found by review). So a set is compiled on a thread of
# its own with a stack of _PARSE_STACK_BYTES, that thread's alone (policy/stack.py;
# reserved, touched only as deep as it goes: ~20,000 levels), and a statement past these
# bounds is refused before Cedar sees it. Cedar itself refuses an expression nested over
# 100 levels (in `to_pst`), so only absurd ones meet them.
_PARSE_STACK_BYTES = 256 << 20
_PARSE_STACKS = (_PARSE_STACK_BYTES, 64 << 20)  # (64 MiB: ~4,800 levels)
MAX_BRACKET_DEPTH = 1_000  # (, [ and { open at once in one statement
MAX_OPERATORS = 4_000  # operators in one statement
_CODE_ONLY = re.compile(r'"(?:[^"\\]|\\.)*"?|//[^\n]*')  # strings and comments, dropped
_BRACKETS = re.compile(r"[\[\](){}]")
_OPERATORS = re.compile(r"\|\||&&|[=!<>]=?|[-+*.]|\b(?:if|has|in|like|is)\b")
_MANY_ALTERNATIVES = 'for many alternatives use a set, as in resource in [Tool::"a", Tool::"b"]'
_T = TypeVar("_T")


def _on_deep_stack(work: Callable[[], _T]) -> _T:
    """``work()``, run on a thread with a stack of _PARSE_STACK_BYTES, or 64 MiB if an
    address-space limit refuses that (its result, or what it raised); PolicyError if no
    such thread can be started. Only that thread has the larger stack (see ``stack``)."""
    for size in _PARSE_STACKS:  # (an address-space limit may refuse the largest)
        try:
            join = start_thread(work, size)
        except OSError as exc:
            refused = exc
            continue
        return join()
    raise PolicyError(f"cannot start a thread to compile the policies: {refused}")


def _check_size(name: str, statements: list[tuple[int, str]]) -> None:
    """Refuse a statement past MAX_BRACKET_DEPTH or MAX_OPERATORS, naming its line."""
    for line, statement in statements:
        code = _CODE_ONLY.sub(" ", statement)
        depth = deepest = 0
        for bracket in _BRACKETS.findall(code):
            depth += 1 if bracket in "([{" else -1
            deepest = max(deepest, depth)
        operators = len(_OPERATORS.findall(code))
        if deepest > MAX_BRACKET_DEPTH or operators > MAX_OPERATORS:
            raise PolicyError(
                f"{name}:{line}: policy is too large an expression to load ({deepest} brackets "
                f"deep, {operators} operators; at most {MAX_BRACKET_DEPTH} and "
                f"{MAX_OPERATORS}): Cedar nests an expression at most 100 levels deep; "
                + _MANY_ALTERNATIVES,
                data={"file": name, "line": line},
            )


def compile_sources(sources: Mapping[str, str], schema: cedarpy.Schema) -> CompiledPolicies:
    """Parse and validate every source (file name -> Cedar text) and join them.

    Raises PolicyError naming the file, the line of the offending policy and
    Cedar's message when a file does not parse or validate, or when two
    policies share an ``@id``.
    """
    statements = {name: _statements(text) for name, text in sources.items()}
    for name in sorted(sources):
        _check_size(name, statements[name])
    return _on_deep_stack(lambda: _compile(sources, statements, schema))


def _compile(
    sources: Mapping[str, str],
    statements: Mapping[str, list[tuple[int, str]]],
    schema: cedarpy.Schema,
) -> CompiledPolicies:
    infos: dict[str, PolicyInfo] = {}
    by_cedar_id: dict[str, PolicyInfo] = {}
    statics: dict[str, pst.Template] = {}
    digest = hashlib.sha256()
    for name in sorted(sources):
        text = sources[name]
        digest.update(f"{len(name)}:{name}{len(text)}:".encode())
        digest.update(text.encode())
        lines = [line for line, _ in statements[name]]
        for policy in _parse_file(name, text, lines, schema):
            info = _describe(name, policy, lines)
            if info.id in infos:
                first = infos[info.id]
                raise PolicyError(
                    f'{name}:{info.line}: policy id "{info.id}" is already used at '
                    f"{first.file}:{first.line}; give each policy its own @id",
                    data={"file": name, "line": info.line, "policy": info.id},
                )
            infos[info.id] = info
            cedar_id = f"mcp0-{len(by_cedar_id)}"
            by_cedar_id[cedar_id] = info
            statics[cedar_id] = replace(policy, id=cedar_id)
    joined = pst.PolicySet(
        templates=pst.FrozenMap({}), static_policies=pst.FrozenMap(statics), template_links=()
    )
    try:
        policy_set = cedarpy.PolicySet.from_pst(joined)
    except ValueError as exc:  # pragma: no cover - every file was valid on its own
        raise PolicyError(f"cannot join the policy files: {exc}") from exc
    return CompiledPolicies(policy_set, infos, by_cedar_id, dict(sources), digest.hexdigest())


def _parse_file(
    name: str, text: str, lines: list[int], schema: cedarpy.Schema
) -> list[pst.Template]:
    """The file's policies in source order (``lines``: where each statement starts); a
    template is refused."""
    try:
        parsed = cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        line = _failing_line(text)
        where = f"{name}:{line}" if line is not None else name
        raise PolicyError(
            f"{where}: cannot parse policy: {exc}",
            data={"file": name, "line": line, "errors": [str(exc)]},
        ) from exc
    validation = cedarpy.validate_policies(text, schema)
    if not validation.validation_passed:
        ids = validation.id_annotations_by_policy_id
        errors: list[str] = []
        for err in validation.errors:
            # named as everywhere else: its @id, or FILE#N (Cedar's own is policyN)
            label = ids.get(err.policy_id) or (
                f"{name}#{_position(err.policy_id)}"
                if _POSITIONAL_ID.fullmatch(err.policy_id)
                else err.policy_id
            )
            line = _line_of(err.policy_id, lines)
            where = f"{name}:{line}" if line is not None else name
            message = _FOR_POLICY.sub("", err.error)
            entry = f'{where}: policy "{label}": {message}' if label else f"{where}: {message}"
            if entry not in errors:  # Cedar repeats an error once per request environment
                errors.append(entry)
        raise PolicyError(
            "policy does not validate against the MCP-ZERO schema: " + "; ".join(errors),
            data={"file": name, "errors": errors},
        )
    try:
        tree = parsed.to_pst()
    except ValueError as exc:
        line = _failing_line(text, lambda statement: cedarpy.PolicySet.from_str(statement).to_pst())
        where = f"{name}:{line}" if line is not None else name
        hint = f"; {_MANY_ALTERNATIVES}" if "nesting" in str(exc) else ""
        raise PolicyError(
            f"{where}: policy uses Cedar syntax this version cannot inspect: {exc}{hint}",
            data={"file": name, "line": line},
        ) from exc
    if tree.templates:
        # Built into the set with no links, a template never applied: a forbid on
        # ?principal forbade nothing, and the set loaded as valid (found by review)
        first = min(tree.templates.values(), key=lambda t: _position(t.id))
        line = _line_of(first.id, lines)
        label = first.annotations.get("id") or f"{name}#{_position(first.id)}"
        raise PolicyError(
            f'{name}:{line}: policy "{label}" is a template (it has ?principal or ?resource): '
            "a template applies only to the principals and resources it is linked to, and "
            "MCP-ZERO links none; name them in the policy instead",
            data={"file": name, "line": line, "policy": label},
        )
    return sorted(tree.static_policies.values(), key=lambda t: _position(t.id))


# The actions obligations apply to: those a plugin runs (the kernel's governed path).
_OBLIGED_VERBS = frozenset({"call_tool", "read_resource", "get_prompt", "complete"})
# Every annotation MCP-ZERO reads: another is a typo whose obligation would silently not
# hold (``@Redact("pii")`` redacted nothing: found by review).
_ANNOTATIONS = ("id", "reason", "redact", "audit")


def _describe(name: str, template: pst.Template, lines: list[int]) -> PolicyInfo:
    annotations = template.annotations
    position = _position(template.id)
    policy_id = annotations.get("id") or f"{name}#{position}"
    line = _line_of(template.id, lines)
    if "id" in annotations and not annotations["id"].strip():
        raise _policy_error(
            name,
            line,
            f"{name}#{position}",
            "@id names nothing; give the policy a name, or drop the @id",
        )
    if policy_id == DEFAULT_DENY:
        # its denials would be counted with those no permit matched (found by review)
        raise _policy_error(
            name,
            line,
            policy_id,
            f'@id "{DEFAULT_DENY}" is reserved: it counts the denials no permit matched; '
            "give the policy another name",
        )
    unknown = sorted(set(annotations).difference(_ANNOTATIONS))
    if unknown:
        raise _policy_error(
            name,
            line,
            policy_id,
            f"unknown annotation {', '.join('@' + key for key in unknown)}; "
            f"the annotations are: {', '.join('@' + key for key in _ANNOTATIONS)}",
        )
    redact = frozenset[str]()
    if "redact" in annotations:
        redact = _redact_labels(name, line, policy_id, template.effect, annotations["redact"])
    audit_before = False
    if "audit" in annotations:
        audit_before = _audit_when(name, line, policy_id, template.effect, annotations["audit"])
    verbs: frozenset[str] | None
    action = template.action
    if isinstance(action, pst.ActionEq):
        verbs = frozenset({action.entity.id})
    elif isinstance(action, pst.ActionIn):
        verbs = frozenset(uid.id for uid in action.entities)
    else:
        verbs = None
    if (redact or audit_before) and verbs is not None and verbs.isdisjoint(_OBLIGED_VERBS):
        obligation = "@redact" if redact else "@audit"
        raise _policy_error(
            name,
            line,
            policy_id,
            f"{obligation} cannot apply to the actions it allows ({', '.join(sorted(verbs))}): "
            f"obligations apply to {', '.join(sorted(_OBLIGED_VERBS))}; widen its action "
            "scope or drop it",
        )
    reads_labels, named_labels = _label_reading(template.clauses)
    if unknown_labels := sorted(named_labels - LABELS):
        # it could never match: a forbid on a misspelt label never fired (found by review)
        raise _policy_error(
            name,
            line,
            policy_id,
            "a condition compares context.labels with unknown label "
            f"{', '.join(repr(label) for label in unknown_labels)}; "
            f"the labels are: {', '.join(sorted(LABELS))}",
        )
    return PolicyInfo(
        id=policy_id,
        effect=template.effect,
        reason=annotations.get("reason") or None,
        file=name,
        line=line,
        verbs=verbs,
        principal=_scope(template.principal),
        resource=_scope(template.resource),
        redact=redact,
        reads_labels=reads_labels,
        audit_before=audit_before,
    )


def _policy_error(name: str, line: int | None, policy_id: str, problem: str) -> PolicyError:
    where = f"{name}:{line}" if line is not None else name
    return PolicyError(
        f'{where}: policy "{policy_id}": {problem}',
        data={"file": name, "line": line, "policy": policy_id},
    )


def _redact_labels(
    name: str, line: int | None, policy_id: str, effect: str, value: str
) -> frozenset[str]:
    """The labels of a ``@redact("secret, pii")`` annotation. Raises PolicyError for one
    on a forbid, one that names no label, or one that names a label no detector gives."""
    known = ", ".join(sorted(LABELS))
    if effect != "permit":
        raise _policy_error(
            name,
            line,
            policy_id,
            "@redact is an obligation of an allow; a forbid cannot carry it (put it on the "
            "permit that allows the action)",
        )
    labels = [part.strip() for part in value.split(",")]
    if not any(labels):
        raise _policy_error(name, line, policy_id, f"@redact names no label; name some of: {known}")
    unknown = [label for label in labels if label not in LABELS]
    if unknown:
        raise _policy_error(
            name,
            line,
            policy_id,
            f"@redact names unknown label {', '.join(repr(label) for label in unknown)}; "
            f"the labels are: {known}",
        )
    return frozenset(labels)


def _audit_when(name: str, line: int | None, policy_id: str, effect: str, value: str) -> bool:
    """An ``@audit("before")`` annotation (True). Raises PolicyError for one on a forbid (a
    denial is recorded anyway) or with another value."""
    if effect != "permit":
        raise _policy_error(
            name,
            line,
            policy_id,
            "@audit is an obligation of an allow; a forbid cannot carry it (every denial is "
            "recorded anyway)",
        )
    if value.strip() != "before":
        raise _policy_error(
            name,
            line,
            policy_id,
            f'@audit takes "before" (record the action before it runs, as well as its '
            f"outcome), not {value[:40]!r}",
        )
    return True


_CONTEXT_LABELS = pst.GetAttr(pst.Var("context"), "labels")
# The operators by which a condition compares ``context.labels`` with labels it names.
_LABEL_COMPARISONS = frozenset({"contains", "contains_any", "contains_all", "eq", "not_eq"})


def _label_reading(clauses: tuple[pst.Clause, ...]) -> tuple[bool, set[str]]:
    """Whether a condition reads ``context.labels``, or the context whole (``context ==
    {...}``): only then do detectors need to run for the policy; and the labels it compares
    ``context.labels`` with (``contains("secret")``, ``containsAny(["pii"])``, ``==``...)."""
    reads = False
    named: set[str] = set()
    stack: list[object] = list(clauses)
    while stack:
        node = stack.pop()
        if isinstance(node, pst.GetAttr) and node.base == pst.Var("context"):
            reads = reads or node.attr == "labels"
            continue  # nothing inside but the context
        if isinstance(node, pst.Var) and node.name == "context":
            reads = True
        elif isinstance(node, pst.BinaryOp) and node.op in _LABEL_COMPARISONS:
            # (also through records and conditionals: `{"l": context.labels}.l.contains("x")`,
            # `{"l": context.labels} == {"l": ["x"]}` escaped the check: found by review)
            named |= _labels_named([node.left], [node.right], by_field=node.op in _EQUALITY)
        if isinstance(node, Mapping):
            stack.extend(node.values())
        elif isinstance(node, tuple):
            stack.extend(node)
        elif is_dataclass(node) and not isinstance(node, type):
            stack.extend(getattr(node, f.name) for f in fields(node))
    return reads, named


_EQUALITY = frozenset({"eq", "not_eq"})


def _resolved(expr: pst.Expr) -> list[pst.Expr]:
    """What ``expr`` may stand for, written out: the field of a record literal it reads
    (``{"l": e}.l`` is ``e``), each branch of a conditional; else ``expr`` itself."""
    if isinstance(expr, pst.IfThenElse):
        return _resolved(expr.then_expr) + _resolved(expr.else_expr)
    if isinstance(expr, pst.GetAttr):
        fields_read = [
            base.fields[expr.attr]
            for base in _resolved(expr.base)
            if isinstance(base, pst.Record) and expr.attr in base.fields
        ]
        if fields_read:
            return [found for field in fields_read for found in _resolved(field)]
    return [expr]


def _labels_named(lefts: list[pst.Expr], rights: list[pst.Expr], *, by_field: bool) -> set[str]:
    """The labels a comparison of what ``lefts`` and ``rights`` may stand for names, when
    one side may be ``context.labels``; with ``by_field`` (``==``, ``!=``), also in the
    fields of the same name of records on both sides. (Not in the context compared with a
    record: Cedar's validator refuses that, its ``plugin`` being optional.) Each side is
    taken whole, not branch by branch: linear in the expression's size."""
    lefts = [found for expr in lefts for found in _resolved(expr)]
    rights = [found for expr in rights for found in _resolved(expr)]
    named: set[str] = set()
    if _CONTEXT_LABELS in lefts:
        named.update(_string_literals(rights))
    if _CONTEXT_LABELS in rights:
        named.update(_string_literals(lefts))
    if by_field:
        left_fields, right_fields = _fields(lefts), _fields(rights)
        for name in left_fields.keys() & right_fields.keys():
            named |= _labels_named(left_fields[name], right_fields[name], by_field=True)
    return named


def _fields(exprs: list[pst.Expr]) -> dict[str, list[pst.Expr]]:
    """The fields of the record literals among ``exprs``, by name."""
    fields_by_name: dict[str, list[pst.Expr]] = {}
    for expr in exprs:
        if isinstance(expr, pst.Record):
            for name, value in expr.fields.items():
                fields_by_name.setdefault(name, []).append(value)
    return fields_by_name


def _string_literals(exprs: list[pst.Expr]) -> list[str]:
    """The strings ``exprs`` are, or their sets hold, written out."""
    strings = []
    for value in exprs:
        for element in value.elements if isinstance(value, pst.Set) else (value,):
            strings += [s.value for s in _resolved(element) if isinstance(s, pst.StringLit)]
    return strings


def _scope(scope: pst.PrincipalOrResourceConstraint) -> TargetScope:
    if isinstance(scope, pst.ScopeAny):
        return ANY_SCOPE
    if isinstance(scope, pst.ScopeIs):
        return TargetScope(entity_type=scope.entity_type.basename)
    etype = scope.entity_type.basename if isinstance(scope, pst.ScopeIsIn) else None
    entity = scope.entity
    uid = (entity.type.basename, entity.id) if isinstance(entity, pst.EntityUid) else None
    return TargetScope(entity_type=etype, entity=uid, within=not isinstance(scope, pst.ScopeEq))


def _position(positional_id: str) -> int:
    match = _POSITIONAL_ID.fullmatch(positional_id)
    return int(match.group(1)) if match else 0


def _line_of(positional_id: str, lines: list[int]) -> int | None:
    match = _POSITIONAL_ID.fullmatch(positional_id)
    if match is None:
        return None
    index = int(match.group(1))
    return lines[index] if index < len(lines) else None


def _statements(text: str) -> list[tuple[int, str]]:
    """Split Cedar text into policy statements: (line where it starts, its text).

    Cedar's parse errors carry no position through cedarpy, so we find the
    statement that fails ourselves; this splitter knows strings and ``//``
    comments, which is all Cedar has that could hide a ``;``.
    """
    out: list[tuple[int, str]] = []
    line = 1
    start: int | None = None
    start_line = 1
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif not ch.isspace():
            if start is None:
                start, start_line = i, line
            if ch == '"':
                i += 1
                while i < n and text[i] != '"':
                    if text[i] == "\n":
                        line += 1
                    i += 2 if text[i] == "\\" else 1
            elif ch == ";":
                out.append((start_line, text[start : i + 1]))
                start = None
        i += 1
    if start is not None:
        out.append((start_line, text[start:]))
    return out


def _failing_line(
    text: str, check: Callable[[str], object] = cedarpy.PolicySet.from_str
) -> int | None:
    """The line where the first statement that ``check`` (parsing, by default) refuses on
    its own starts."""
    for line, statement in _statements(text):
        try:
            check(statement)
        except ValueError:
            return line
    return None
