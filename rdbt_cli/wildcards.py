"""Variants and wildcards in prompts, read by dynamicprompts (the library behind A1111's Dynamic Prompts extension).

    {red|blue} hair          one of the options
    {2::red|blue} hair       weighted: red twice as often as blue
    {2$$red|blue|green}      two different options, joined by "," ({2$$ and $$...} joins by " and ")
    __colors__ hair          one line of colors.txt in a wildcards folder (sub/name for sub/name.txt)

Random mode seeds the choice from the image's seed, so the same seed gives the same prompt (and `--count 4` gives four
draws); combinatorial mode lists every prompt the template can make. The negative prompt's variants are drawn too, in
both modes from the image's seed (through `negative_seed`, so its draws are not in step with the positive's). Only prompts with `{`, `}` or `__` are parsed, and
`#`, `%` and a lone `$` (comments, wraps and variables to dynamicprompts) stay text, so ComfyUI weights `(word:1.2)`,
`<lora:...>` tags and plain prompts pass through untouched.

The wildcards folders are `wildcards/` in each models folder, then in rdbt's own folder ($RDBT_HOME). Every problem
(a missing or empty file, a file that uses itself, an empty option, an unclosed brace) is found by `check` before any
weights load. No torch here; dynamicprompts is imported only for prompts that need it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, Optional

from rdbt_cli.config import user_dir
from rdbt_cli.errors import ConfigError

FOLDER = "wildcards"
MAX_COMBINATIONS = 1000  # a combinatorial template past this is a typo (or a job for --count), not a plan

_SYNTAX = re.compile(r"[{}]|__")
# dynamicprompts reads these as comment, variable and wrap marks; in an Anima prompt they are text. Swapped for
# private-use characters while parsing ("$$" stays: it is the multi-choice mark).
_PROTECT = {"#": "\ue000", "%": "\ue001", "$": "\ue002"}
_MULTI = "\ue003"


def has_syntax(text: Optional[str]) -> bool:
    return bool(text) and bool(_SYNTAX.search(text))


def folders(models_dirs: Iterable[Path]) -> list[Path]:
    """The wildcards folders that exist, in search order (the first file of a name wins)."""
    out = []
    for d in [*(Path(m) / FOLDER for m in models_dirs), user_dir() / FOLDER]:
        if d.is_dir() and d not in out:
            out.append(d)
    return out


def _protect(text: str) -> str:
    text = text.replace("$$", _MULTI)
    for char, mark in _PROTECT.items():
        text = text.replace(char, mark)
    return text.replace(_MULTI, "$$")


def _unprotect(text: str) -> str:
    for char, mark in _PROTECT.items():
        text = text.replace(mark, char)
    return text


def negative_seed(seed: int) -> int:
    """The seed the negative prompt's variants are drawn with: fixed by the image seed, but not the positive's own
    (the same seed would tie the nth option of both, e.g. always {red|blue} with {blurry|noisy}'s first)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"negative {seed}".encode()).digest()[:8], "little")


class Wildcards:
    """Templates over one set of wildcards folders; files are read once."""

    def __init__(self, dirs: list[Path]):
        self.dirs = dirs
        self._manager = None
        self._checked: set[str] = set()

    def manager(self):
        if self._manager is None:
            from dynamicprompts.wildcards import WildcardManager
            from dynamicprompts.wildcards.item import WildcardItem
            from dynamicprompts.wildcards.values import WildcardValues

            class Protected(WildcardManager):
                """A file's lines are prompts too: their # % $ stay text."""

                def get_values(self, wildcard):
                    items = super().get_values(wildcard).items
                    return WildcardValues.from_items(
                        WildcardItem(_protect(i.content), i.weight) if isinstance(i, WildcardItem) else _protect(i)
                        for i in items)

            logging.getLogger("dynamicprompts").setLevel(logging.ERROR)  # a missing file is our error, not its warning
            self._manager = Protected(root_map={"": self.dirs[::-1]})  # its later folders win a name
        return self._manager

    def _values(self, name: str, where: str) -> list[str]:
        values = self.manager().get_values(name)
        if not values:
            dirs = (f"in {', '.join(map(str, self.dirs))}" if self.dirs else
                    f"(there is no wildcards folder yet: make {user_dir() / FOLDER} or wildcards/ in the models "
                    "folder)")
            raise ConfigError(f"{where}: wildcard __{name}__: no file {name}.txt with any lines {dirs}; add it or fix "
                              "the name")
        return [_unprotect(v) for v in values.string_values]

    def _parse(self, text: str, where: str):
        from dynamicprompts.parser.parse import parse

        try:
            return parse(_protect(text))
        except Exception as exc:  # pyparsing's ParseException, with a column
            column = getattr(exc, "col", None)
            at = f" at character {column}" if column else ""
            raise ConfigError(f"{where}: cannot read the variants{at} ({_unprotect(text)[:80]!r}); close every {{ "
                              "with } and separate options with |") from None

    def check(self, template: str, where: str = "prompt") -> None:
        """Every problem of `template` as one ConfigError: syntax, empty options, missing files, loops."""
        if not has_syntax(template) or template in self._checked:
            return
        self._walk(self._parse(template, where), where, ())
        self._checked.add(template)

    def _walk(self, command, where: str, chain: tuple[str, ...]) -> None:
        from dynamicprompts.commands import (LiteralCommand, SequenceCommand, VariantCommand, WildcardCommand,
                                             WrapCommand)

        if isinstance(command, SequenceCommand):
            for token in command.tokens:
                self._walk(token, where, chain)
        elif isinstance(command, VariantCommand):
            for option in command.variants:
                if _empty(option.value, LiteralCommand, SequenceCommand):
                    shown = "|".join(_show(o.value) for o in command.variants)
                    raise ConfigError(f"{where}: the variant {{{shown}}} has an empty option; remove the extra | "
                                      "(every option needs words)")
                self._walk(option.value, where, chain)
        elif isinstance(command, WildcardCommand):
            if not isinstance(command.wildcard, str):  # a name made by a variant: checked when it is drawn
                self._walk(command.wildcard, where, chain)
                return
            name = command.wildcard
            if name in chain:
                loop = " -> ".join(f"__{n}__" for n in (*chain[chain.index(name):], name))
                raise ConfigError(f"{where}: wildcard __{name}__ uses itself ({loop}); remove the loop")
            for value in self._values(name, where):
                self._walk(self._parse(value, f"wildcard __{name}__"), where, (*chain, name))
        elif isinstance(command, WrapCommand):
            self._walk(command.wrapper, where, chain)
            self._walk(command.inner, where, chain)

    def pick(self, template: str, seed: int, where: str = "prompt") -> str:
        """The prompt `template` makes for an image of this seed (the template itself when it has no syntax)."""
        if not has_syntax(template):
            return template
        self.check(template, where)
        from dynamicprompts.generators import RandomPromptGenerator

        generator = RandomPromptGenerator(self.manager(), seed=seed)
        return _unprotect(self._run(lambda: generator.generate(_protect(template), 1)[0], where))

    def combinations(self, template: str, where: str = "prompt") -> list[str]:
        """Every prompt `template` can make, in order; more than MAX_COMBINATIONS is refused."""
        if not has_syntax(template):
            return [template]
        self.check(template, where)
        from dynamicprompts.generators import CombinatorialPromptGenerator

        generator = CombinatorialPromptGenerator(self.manager())
        found = self._run(lambda: generator.generate(_protect(template), MAX_COMBINATIONS + 1), where)
        if len(found) > MAX_COMBINATIONS:
            raise ConfigError(f"{where}: makes more than {MAX_COMBINATIONS} prompts in combinatorial mode; use fewer "
                              "options (or random mode with --count)")
        return [_unprotect(p) for p in found]

    @staticmethod
    def _run(make, where: str):
        try:
            return make()
        except RecursionError:  # a loop through a wildcard name made by a variant
            raise ConfigError(f"{where}: its wildcards use each other in a loop; remove the loop") from None


def _empty(command, literal, sequence) -> bool:
    if isinstance(command, literal):
        return not command.literal.strip()
    return isinstance(command, sequence) and all(_empty(t, literal, sequence) for t in command.tokens)


def _show(command) -> str:
    """A parsed option as text again, for messages."""
    for attr in ("literal", "tokens", "wildcard"):
        value = getattr(command, attr, None)
        if isinstance(value, str):
            return _unprotect(value) if attr == "literal" else f"__{value}__"
        if isinstance(value, list):
            return "".join(_show(t) for t in value)
    if hasattr(command, "variants"):
        return "{" + "|".join(_show(o.value) for o in command.variants) + "}"
    return "..."
