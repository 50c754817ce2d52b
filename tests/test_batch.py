import io
import json
from pathlib import Path
from collections import Counter

import pytest

from rdbt_cli.batch import (
    Manifest, Task, batch_id, line_seed, load_done, manifest_path, parse_batch, plan_jobs,
    read_batch_source, torchrun_env,
)
from rdbt_cli.config import LoraSpec
from rdbt_cli.settings import GenParams, layer, parse_lora_arg

from rdbt_cli.errors import ConfigError

BATCH = """\
# my batch
1girl, solo, (smile:1.2), it's \\(cute\\)

2girls --steps 24 -n "lowres, bad hands" --lora style:0.6 --lora "C:\\loras\\my lora.safetensors:0.3" --lora plain
   # indented comment
landscape --sampler euler --scheduler karras --cfg=4.5 --shift 2 --seed 7 --size 832x1216 --count 3 --preset turbo
bad one --sampeler euler
castle --width 768 --height 1024 --negative '' --preset ./my.toml
"""


def test_parse_batch_lines_comments_and_overrides():
    lines = parse_batch(BATCH)
    assert [line.lineno for line in lines] == [2, 4, 6, 7, 8]
    first, second, third, bad, last = lines
    assert first.prompt == "1girl, solo, (smile:1.2), it's \\(cute\\)" and first.error is None
    assert first.overrides == GenParams(prompt=first.prompt)
    assert second.prompt == "2girls" and second.error is None
    assert second.overrides.steps == 24 and second.overrides.negative == "lowres, bad hands"
    assert second.overrides.loras == [
        LoraSpec("style", 0.6), LoraSpec("C:\\loras\\my lora.safetensors", 0.3), LoraSpec("plain", 1.0)]
    o = third.overrides
    assert (o.sampler, o.scheduler, o.cfg, o.shift, o.seed, o.width, o.height, o.count) == (
        "euler", "karras", 4.5, 2.0, 7, 832, 1216, 3)
    assert third.preset == "turbo" and second.preset is None
    assert bad.error is not None and bad.error.startswith("line 7:") and "--sampeler" in bad.error
    assert "--sampler" in bad.error and "--lora" in bad.error  # lists the valid flags
    assert last.error is None and (last.overrides.width, last.overrides.height) == (768, 1024)
    assert last.overrides.negative == "" and last.preset == "./my.toml"


@pytest.mark.parametrize(
    "line, needle",
    [
        ("a --steps 0", "at least 1"),
        ("a --steps many", "whole number"),
        ("a --cfg x", "number"),
        ("a --size 100x100", "multiple of 16"),
        ("a --scheduler nope", "karras"),
        ("a --count", "needs a value"),
        ('a -n "open', "quote"),
        ("--steps 3", "no prompt"),
        ("a --lora :0.5", "name"),
        ("a --seed -2", "seed"),
        ("a stray --steps 3 extra", "'extra'"),
    ],
)
def test_bad_line_is_an_error_on_that_line_only(line, needle):
    lines = parse_batch(f"good one\n{line}\nanother --steps 5\n")
    assert [x.error is None for x in lines] == [True, False, True]
    assert lines[1].error.startswith("line 2:") and needle in lines[1].error, lines[1].error
    assert lines[2].overrides.steps == 5


def test_windows_line_endings_and_bom_keep_line_numbers_and_batch_id():
    unix = "a\n\n# c\nb --steps 3\n"
    dos = "\ufeff" + unix.replace("\n", "\r\n")
    assert [(x.lineno, x.prompt, x.overrides.steps) for x in parse_batch(dos)] == [(1, "a", None), (4, "b", 3)]
    assert batch_id(dos) == batch_id(unix) != batch_id(unix + "c\n")


def test_read_batch_source_file_and_stdin(tmp_path, monkeypatch):
    path = tmp_path / "prompts.txt"
    path.write_text("x --steps 2\n", encoding="utf-8")
    assert read_batch_source(str(path)) == "x --steps 2\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n# skip\n"))
    assert [x.prompt for x in parse_batch(read_batch_source("-"))] == ["from stdin"]
    with pytest.raises(ConfigError, match="missing.txt: batch file not found"):
        read_batch_source(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        read_batch_source(tmp_path / "latin1.txt")


def test_parse_lora_arg():
    assert parse_lora_arg("name:0.7") == LoraSpec("name", 0.7)
    assert parse_lora_arg("name") == LoraSpec("name", 1.0)
    assert parse_lora_arg("a:b:-1.5e-1") == LoraSpec("a:b", -0.15)
    assert parse_lora_arg("C:\\loras\\x.safetensors") == LoraSpec("C:\\loras\\x.safetensors", 1.0)
    assert parse_lora_arg("C:\\loras\\x.safetensors:.5") == LoraSpec("C:\\loras\\x.safetensors", 0.5)
    assert parse_lora_arg("style:v2") == LoraSpec("style:v2", 1.0)
    with pytest.raises(ConfigError):
        parse_lora_arg(":1")


def test_merge_flags_line_beats_command():
    base = GenParams(steps=10, cfg=2.0, loras=[LoraSpec("a", 1.0)])
    line = parse_batch("p --steps 4 --lora b:0.5")[0].overrides
    out = layer(base, line)
    assert (out.prompt, out.steps, out.cfg) == ("p", 4, 2.0)
    assert out.loras == [LoraSpec("a", 1.0), LoraSpec("b", 0.5)]
    assert layer(GenParams(), GenParams()).loras is None


def test_line_seed_is_stable_per_batch_and_line():
    b = batch_id("x\n")
    assert line_seed(b, 3) == line_seed(b, 3)
    assert len({line_seed(b, 1), line_seed(b, 2), line_seed(batch_id("y\n"), 1)}) == 3


# --- planning and the manifest ---------------------------------------------------------------------------------------

PLAN_TEXT = "a\nb --count 3\nbroken --nope 1\n# c\nd --count 2\ne\n"


def plan_inputs():
    lines = parse_batch(PLAN_TEXT)
    counts = [line.overrides.count or 1 for line in lines]
    return lines, counts


def all_keys(lines, counts):
    return {job.key for job in plan_jobs(lines, counts)}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_job_made_by_exactly_one_rank(world):
    lines, counts = plan_inputs()
    made = Counter(job.key for rank in range(world) for job in plan_jobs(lines, counts, rank, world))
    assert set(made) == all_keys(lines, counts) and set(made.values()) == {1}
    assert len(made) == 1 + 3 + 2 + 1  # the broken line makes no jobs
    assert {(k.split(":")[0]) for k in made} == {"1", "2", "5", "6"}


def test_counts_by_line_number_and_spread_of_one_line():
    lines, counts = plan_inputs()
    by_line = {line.lineno: c for line, c in zip(lines, counts)}
    assert plan_jobs(lines, by_line, 1, 2) == plan_jobs(lines, counts, 1, 2)
    # A line with --count 3 is shared out instead of landing on one rank.
    ranks = {rank for rank in range(3) for job in plan_jobs(lines, counts, rank, 3) if job.lineno == 2}
    assert ranks == {0, 1, 2}
    with pytest.raises(ConfigError):
        plan_jobs(lines, counts, rank=2, world=2)


def test_resume_after_torn_last_line(tmp_path):
    text = PLAN_TEXT
    bid = batch_id(text)
    lines, counts = plan_inputs()
    jobs = plan_jobs(lines, counts)
    with Manifest(tmp_path, bid, 0) as m:
        for job in jobs[:3]:
            (tmp_path / f"{job.key.replace(':', '_')}.png").write_bytes(b"png")
            m.add(job, f"{job.key.replace(':', '_')}.png", seed=100 + job.index)
    path = manifest_path(tmp_path, bid, 0)
    with open(path, "ab") as f:  # a crash in the middle of writing the 4th record
        f.write(b'{"job": "' + jobs[3].key.encode() + b'", "fi')
    done = load_done(tmp_path, bid)
    assert set(done) == {j.key for j in jobs[:3]} and done[jobs[0].key]["seed"] == 100
    todo = plan_jobs(lines, counts, done=done)
    assert todo == jobs[3:]
    # Resuming appends after the torn fragment without gluing the next record onto it.
    with Manifest(tmp_path, bid, 0) as m:
        m.add(todo[0], "next.png", seed=5)
    done = load_done(tmp_path, bid)
    assert set(done) == {j.key for j in jobs[:4]} and done[jobs[3].key]["file"] == "next.png"
    # A different batch file starts fresh in the same folder.
    assert load_done(tmp_path, batch_id(text + "more\n")) == {}


def test_merge_ranks_then_resume_with_another_world_size(tmp_path):
    lines, counts = plan_inputs()
    bid = batch_id(PLAN_TEXT)
    every = all_keys(lines, counts)
    # Three ranks ran and were interrupted after their first image each.
    for rank in range(3):
        with Manifest(tmp_path, bid, rank) as m:
            first = plan_jobs(lines, counts, rank, 3)[0]
            m.add(first, f"r{rank}.png", seed=rank)
    done = load_done(tmp_path, bid)
    assert len(done) == 3 and {r["file"] for r in done.values()} == {"r0.png", "r1.png", "r2.png"}
    # Resumed on two ranks: together they make exactly the rest.
    rest = Counter(j.key for rank in range(2) for j in plan_jobs(lines, counts, rank, 2, done=done))
    assert set(rest) == every - set(done) and set(rest.values()) == {1}
    # Records from another batch or stray files in the folder are ignored.
    (tmp_path / f".rdbt-batch-{bid}.rankX.jsonl").write_text(json.dumps({"job": "9:x:0", "file": "f"}) + "\n")
    (tmp_path / f".rdbt-batch-{bid}.rank7.jsonl").write_text("not json\n[1, 2]\n{\"job\": 3}\n")
    assert load_done(tmp_path, bid) == done


def test_load_done_can_require_files(tmp_path):
    bid = batch_id("a\n")
    job = plan_jobs(parse_batch("a\n"), [1])[0]
    with Manifest(tmp_path / "out", bid) as m:  # the folder is created on first use
        m.add(job, "a.png", seed=1, prompt="a")
    assert load_done(tmp_path / "out", bid)[job.key]["prompt"] == "a"
    assert load_done(tmp_path / "out", bid, require_files=True) == {}
    (tmp_path / "out" / "a.png").write_bytes(b"")
    assert set(load_done(tmp_path / "out", bid, require_files=True)) == {job.key}
    assert load_done(tmp_path / "nowhere", bid) == {}


def test_job_key_changes_with_line_text():
    a = plan_jobs(parse_batch("a --steps 3\n"), [1])[0]
    b = plan_jobs(parse_batch("a --steps 4\n"), [1])[0]
    assert isinstance(a, Task) and a.lineno == b.lineno and a.key != b.key


def test_torchrun_env():
    assert torchrun_env({}) == (0, 1, 0)
    assert torchrun_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 4, 1)
    for bad in ({"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "x"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(ConfigError, match="WORLD_SIZE"):
            torchrun_env(bad)


def test_batch_source_errors_name_the_file(tmp_path):
    from rdbt_cli.batch import read_batch_source
    from rdbt_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        read_batch_source(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="is a folder"):
        read_batch_source(tmp_path)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        read_batch_source(latin)


def test_manifest_in_an_unwritable_place_is_an_output_error(tmp_path):
    from rdbt_cli.errors import OutputError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="manifest"):
        Manifest(blocker / "out", "abc", 0)


def test_an_edit_redoes_only_the_changed_lines(tmp_path):
    from rdbt_cli import batch
    from rdbt_cli.config import LoadParams

    load, flags = LoadParams(model="tiny"), GenParams(width=32, height=32, steps=1)
    out = tmp_path / "out"

    def plan(text):
        return batch.plan(text, load, flags, out_dir=out)

    def make(bp):
        return sorted(Path(p).name for p, _ in batch.run(bp, out))

    first = plan("alpha\nbeta --count 2\nalpha\n")
    assert first.done == 0 and len(make(first)) == 4
    seeds = {ln: g.seed for ln, (g, *_) in first.lines.items()}
    assert seeds[1] != seeds[3]  # a repeated line is another image, not the same one twice
    # a fixed typo, a new line on top and a wider count: only what changed is made; the rest keeps its seed
    edited = plan("new line\nalpha\nbeta --count 3\nalfa\n")
    assert edited.lines[2][0].seed == seeds[1] and edited.lines[3][0].seed == seeds[2]
    assert edited.done == 3 and [(t.lineno, t.index) for t in edited.jobs] == [(1, 0), (3, 2), (4, 0)]
    assert len(make(edited)) == 3
    assert plan("new line\nalpha\nbeta --count 3\nalfa\n").jobs == []  # and a rerun makes nothing
    # other batch-wide flags change every image: nothing is reused
    assert batch.plan("alpha\n", load, GenParams(width=32, height=32, steps=2), out_dir=out).done == 0


def test_a_batch_begun_by_an_earlier_version_resumes_as_it_began(tmp_path):
    import json

    from rdbt_cli import batch
    from rdbt_cli.config import LoadParams

    load, flags = LoadParams(model="tiny"), GenParams(width=32, height=32, steps=1)
    text = "alpha\nbeta\n"
    bid = batch.plan(text, load, flags, out_dir=tmp_path).id
    # what an earlier version wrote after its first image: keys by line number, a manifest named by the batch id
    (tmp_path / f".rdbt-batch-{bid}.rank0.jsonl").write_text(
        json.dumps({"job": f"1:{batch.line_hash('alpha')}:0", "file": "L0001-000-1.png", "seed": 1}) + "\n")
    bp = batch.plan(text, load, flags, out_dir=tmp_path)
    assert bp.manifest == bid and bp.done == 1 and [t.key for t in bp.jobs] == [f"2:{batch.line_hash('beta')}:0"]
    assert bp.lines[2][0].seed == line_seed(bid, 2)  # the seed that version gave the line
