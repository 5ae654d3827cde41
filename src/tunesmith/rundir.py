"""Where a command writes: output files, run directories, checkpoints, and the guards that keep runs apart.

* :func:`check_output_file`, :func:`check_output_dir` — an output path is checked before any work is done (a file
  where a file is expected, a writable folder), so a long generation never ends in a traceback at the last write.
* :func:`open_run` — what every training recipe (SFT, classify, DPO, SPIN) calls before training, in a few lines::

      fp = run_fingerprint(cfg)                               # recipes.training: the config parts + named extras
      with open_run(cfg.output_dir, "sft", fp, cfg.training.resume_from_checkpoint, main=...) as run:
          if run.finished:
              return ...                                      # a resumed finished run: nothing to do
          trainer.add_callback(run.checkpoint_callback())     # the fingerprint goes into every checkpoint
          if not (run.checkpoint and training_done(run.checkpoint)):  # else: load the checkpoint, do not train
              trainer.train(resume_from_checkpoint=run.checkpoint)
          ...                                                 # save; write FINISHED_FILE last

  It holds an exclusive lock on the directory (:class:`RunLock`), refuses a directory holding a finished run, another
  command's run, checkpoints of a run nobody asked to resume, or files tunesmith did not write, and resolves
  ``resume_from_checkpoint`` to the newest COMPLETE checkpoint whose fingerprint matches the run's settings. It
  returns a :class:`RunDir`, which also records the finished stages of a run made of several (DPO's reference
  scoring; SPIN's generate / reference / train per iteration, opened with ``continues=True``: a rerun takes the run
  up where it stopped) in the directory's owner record, beside the fingerprint.
* :class:`Fingerprint` — a digest of the settings that decide what a run computes. It is stored in every checkpoint's
  ``trainer_state.json`` (through a stateful Trainer callback, so it is written with, and torn with, the file the
  Trainer writes last) and checked on resume: a mismatch is a one-line refusal naming the settings that differ.
* :func:`newest_complete_checkpoint` — checkpoints torn by a kill or a full disk (no or half-written
  ``trainer_state.json``, a truncated ``.safetensors`` file) are skipped.
* :func:`publish_dir` — replace a whole output directory (``tunesmith merge``) from a staging directory; a non-empty
  directory that tunesmith did not write for that command is never deleted.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
from pathlib import Path

from tunesmith.errors import UserError

log = logging.getLogger("tunesmith")

LOCK_FILE = ".tunesmith.lock"
OWNER_FILE = "tunesmith_run.json"  # written into every directory tunesmith creates as a run or output directory
FINISHED_FILE = "tunesmith.yaml"  # the resolved config, written last: its presence marks a finished run
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_BOOKKEEPING = {LOCK_FILE, OWNER_FILE, ".tunesmith_outputs.json"}


# ---------------------------------------------------------------- output files

OUTPUTS_FILE = ".tunesmith_outputs.json"  # per folder: the files tunesmith commands wrote there, and which command
# Names a training run (or merge) writes into its directory: no other command may write them there, even when they
# do not exist yet (a `tunesmith.yaml` written into an unfinished run would mark it finished).
RUN_FILES = frozenset({FINISHED_FILE, OWNER_FILE, LOCK_FILE, OUTPUTS_FILE, TRAINER_STATE, "config.json",
                       "generation_config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                       "README.md", "metrics.jsonl", "tunesmith_template.json", "training_args.bin"})
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?:tmp|partial|old)$")
_LEGACY_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.(?:tmp|partial|old)$")


def temp_prefix(name: str) -> str:
    """The prefix of a temporary file or directory that will become ``name``: ``.NAME.HOST-PID.`` (the writer's
    host and pid, so that a later run can tell a temp file left by a kill from one being written right now)."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f".{name}.{host}-{os.getpid()}."


def clean_stale_temps(folder: str | os.PathLike, name: str | None = None, *, legacy: bool = False) -> list[str]:
    """Remove temporary files and directories in ``folder`` (``name``'s only, when given) left by a tunesmith process
    that is gone (killed mid-write). ``legacy``: also those without a writer's pid (older tunesmith versions) — only
    where this process holds the folder's run lock. Returns the names removed."""
    folder, removed = Path(folder), []
    me = temp_prefix("x")[3:11]
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if m is not None:
            if name is not None and m["name"] != name:
                continue
            if m["host"] != me or _alive(int(m["pid"]), None):
                continue
        elif not (legacy and (lm := _LEGACY_TEMP.match(p.name)) and (name is None or lm["name"] == name)):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    if removed:
        log.warning(f"{folder}: removed {len(removed)} temporary file(s) left by an interrupted run "
                    f"({', '.join(sorted(removed)[:3])}{', ...' if len(removed) > 3 else ''})")
    return removed


def _enclosing_run(p: Path) -> Path | None:
    """The nearest folder holding ``p`` that is a training (or merge) run directory, or None."""
    for d in p.parents:
        if (d / OWNER_FILE).is_file() or (d / FINISHED_FILE).is_file() or (d / LOCK_FILE).exists():
            return d
    return None


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _input_paths(inputs: dict | None):
    for key, value in (inputs or {}).items():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v and isinstance(v, (str, os.PathLike)) and not str(v).startswith("pkg:"):
                yield key, Path(v)


def _written_by(p: Path) -> str | None:
    """The command that wrote the file ``p`` (as recorded by :func:`record_output`), if the file is unchanged since."""
    entry = _read_outputs(p.parent).get(p.name)
    try:
        st = p.stat()
    except OSError:
        return None
    if isinstance(entry, dict) and [entry.get("size"), entry.get("mtime_ns"), entry.get("ino")] == \
            [st.st_size, st.st_mtime_ns, st.st_ino]:
        return entry.get("command")
    return None


def _read_outputs(folder: Path) -> dict:
    try:
        data = json.loads((folder / OUTPUTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def record_output(path: str | os.PathLike, command: str) -> None:
    """Note in the folder's ``.tunesmith_outputs.json`` that ``command`` wrote ``path`` (its size, mtime and inode):
    the same command may replace it later without ``--overwrite``; a file changed since counts as the user's."""
    import fcntl

    from tunesmith.io import atomic_write_json

    p = Path(path)
    st = p.stat()
    fd = os.open(p.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two commands writing into one folder at once keep both records
        except OSError:
            pass
        data = {k: v for k, v in _read_outputs(p.parent).items() if (p.parent / k).exists()}
        data[p.name] = {"command": command, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        atomic_write_json(p.parent / OUTPUTS_FILE, data)
    finally:
        os.close(fd)


def check_output_file(path: str | os.PathLike, key: str = "output", *, command: str | None = None,
                      inputs: dict | None = None, overwrite: bool = False) -> Path:
    """Refuse, in one line and before any work, an output file path that cannot be written: a directory, a path
    under a file, or a folder without write permission. With ``command`` (the command that writes it), also refuse a
    path that is one of the command's ``inputs`` ({key: path or paths}), a run's own file inside a training run
    directory (its weights, config, marker, checkpoints), or an existing file that ``command`` did not write (unless
    ``overwrite``). Temporary files a killed writer left for this path are removed. Returns the path."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: '{key}' names a directory; give a file path (e.g. {p / 'out.jsonl'})")
    _check_writable(p, p.parent, key)
    if command is not None:
        _check_owned(p, key, command, inputs, overwrite)
        clean_stale_temps(p.parent, p.name)
    return p


def check_output_dir(path: str | os.PathLike, key: str = "output_dir", *, command: str | None = None,
                     files=(), inputs: dict | None = None, overwrite: bool = False) -> Path:
    """The same for an output directory: not a file, not under a file, writable; with ``command``, not one of its
    ``inputs``, and each of the ``files`` it writes there checked as :func:`check_output_file` does. Creates
    nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{p}: '{key}' is a file, not a directory")
    _check_writable(p, p, key)
    if command is not None:
        for other, q in _input_paths(inputs):
            if _same_path(p, q):
                raise UserError(f"{p}: '{key}' is also this command's input '{other}'; choose another directory")
        for name in files:
            _check_owned(p / name, key, command, inputs, overwrite)
            clean_stale_temps(p, name)
    return p


def _check_owned(p: Path, key: str, command: str, inputs: dict | None, overwrite: bool) -> None:
    for other, q in _input_paths(inputs):
        if _same_path(p, q):
            raise UserError(f"{p}: '{key}' is also this command's input '{other}'; write the output to another file")
    real = p.resolve()
    run = _enclosing_run(real)
    if run is not None:
        rel = real.relative_to(run)
        if p.name in RUN_FILES or p.name.endswith(_WEIGHT_SUFFIXES) or any(_CHECKPOINT.match(x) for x in rel.parts):
            raise UserError(f"{p}: '{key}' would write over a file of the training run in {run} (a run's weights, "
                            f"config, checkpoints and marker are its own); write the output under another name")
    if p.exists():
        by = _written_by(p)
        if by != command and not overwrite:
            made = f"written by tunesmith {by}" if by else "not written by tunesmith " + command
            raise UserError(f"{p}: '{key}' exists and was {made}; choose another path, or pass --overwrite true "
                            f"to replace it")


def _check_writable(p: Path, folder: Path, key: str) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{p}: cannot write '{key}': {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{p}: cannot write '{key}': no write permission in {existing}")


# ---------------------------------------------------------------- fingerprint

def digest(obj) -> str:
    """A short, stable digest of any JSON-able value (sorted keys; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """The settings that decide what a run computes (``values``, JSON-safe) and their digest."""

    values: dict
    digest: str

    @classmethod
    def of(cls, values: dict) -> "Fingerprint":
        plain = json.loads(json.dumps({k: getattr(v, "value", v) for k, v in values.items()}, default=str))
        return cls(plain, digest(plain))

    def differences(self, other: dict) -> list[str]:
        """The keys whose value differs between this fingerprint and another's ``values``."""
        return sorted(k for k in set(self.values) | set(other) if self.values.get(k) != other.get(k))


@functools.cache
def _callback_class():
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class TunesmithRun(TrainerCallback, ExportableState):
        """Puts the run's fingerprint into every checkpoint's trainer_state.json (``stateful_callbacks``)."""

        def __init__(self, fingerprint: str, config: dict):
            self.fingerprint, self.config = fingerprint, config

        def state(self) -> dict:
            return {"args": {"fingerprint": self.fingerprint, "config": self.config}, "attributes": {}}

        def on_save(self, args, state, control, **kwargs):
            # safetensors writes 0600: a checkpoint's files get the modes the umask gives plain files
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                from tunesmith.io import follow_umask

                follow_umask(ckpt)

    return TunesmithRun


def checkpoint_callback(fp: Fingerprint):
    """A TrainerCallback that stamps every checkpoint the Trainer writes with ``fp``."""
    return _callback_class()(fp.digest, fp.values)


# ---------------------------------------------------------------- checkpoints

def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a .safetensors file is not whole (truncated, or no header), or None. Reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                return f"{path.name} is truncated or not a safetensors file"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"{path.name}: cannot read ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name}: the header is not valid (not a safetensors file, or torn)"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return f"{path.name}: the header is not valid"
    if size < 8 + n + end:
        return f"{path.name} is truncated ({size} bytes, the header promises {8 + n + end})"
    return None


def checkpoint_problem(ckpt: str | os.PathLike) -> str | None:
    """Why a Trainer checkpoint is not complete, or None. The Trainer writes trainer_state.json after the weights,
    optimizer, scheduler and RNG states; a kill or a full disk leaves it missing or half-written."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return f"{ckpt} is not a directory"
    try:
        json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{ckpt.name} has no {TRAINER_STATE} (torn while saving)"
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{ckpt.name}: {TRAINER_STATE} is torn"
    for f in sorted(ckpt.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return f"{ckpt.name}: {problem}"
    return None


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` directories of ``directory``, newest (highest N) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def newest_complete_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint that is complete (see :func:`checkpoint_problem`); torn newer ones are skipped with a
    note."""
    for p in checkpoints(directory):
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        log.warning(f"{p}: skipped, not a complete checkpoint ({problem})")
    return None


def checkpoint_state(ckpt: str | os.PathLike) -> dict:
    """The checkpoint's trainer_state.json (global_step, max_steps, ...)."""
    return json.loads((Path(ckpt) / TRAINER_STATE).read_text(encoding="utf-8"))


def training_done(ckpt: str | os.PathLike) -> bool:
    """Whether the checkpoint already holds the end of training (its step reached the run's max_steps). The Trainer
    resumed from such a checkpoint mid-epoch trains one step too many, so a recipe loads it instead of training."""
    state = checkpoint_state(ckpt)
    return 0 < int(state.get("max_steps") or 0) <= int(state.get("global_step") or 0)


def checkpoint_fingerprint(ckpt: str | os.PathLike) -> dict | None:
    """``{"fingerprint": digest, "config": values}`` stamped into a checkpoint by :func:`checkpoint_callback`, or
    None for a checkpoint without one (another tool's, or an older tunesmith's)."""
    try:
        stamp = checkpoint_state(ckpt).get("stateful_callbacks", {}).get("TunesmithRun")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(stamp, list):  # the Trainer keeps a list when a callback class is registered twice
        stamp = stamp[-1] if stamp else None
    args = stamp.get("args") if isinstance(stamp, dict) else None
    return args if isinstance(args, dict) and isinstance(args.get("fingerprint"), str) else None


def check_checkpoint(ckpt: str | os.PathLike, fp: Fingerprint) -> None:
    """Refuse, in one line, a checkpoint that is torn or that another run (other settings) wrote."""
    problem = checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"resume_from_checkpoint: {ckpt} is not a complete checkpoint ({problem})")
    stamp = checkpoint_fingerprint(ckpt)
    if stamp is None:
        raise UserError(f"{ckpt}: carries no tunesmith fingerprint (written by another tool or an older tunesmith), "
                        f"so it cannot be checked against this run's settings; start afresh in a new output_dir")
    if stamp["fingerprint"] != fp.digest:
        diff = fp.differences(stamp.get("config") or {})
        raise UserError(f"{ckpt}: belongs to a run with other settings (differs in {', '.join(diff) or '?'}); "
                        f"resume it with those settings, or choose another output_dir")


# ---------------------------------------------------------------- the lock

def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` is a live process (and, when ``started`` is known, the same process: pids are reused)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # a zombie: dead, not yet reaped
            return False
        if started is not None and fields[19] != started:
            return False
    except (OSError, IndexError):
        pass
    return True


class RunLock:
    """An exclusive lock on a directory: ``.tunesmith.lock`` holds the owner's pid, host and start time and is
    ``flock``-ed while the run lives. A second run finds it held (or names a live pid) and stops in one line naming
    that pid; a lock left by a dead process (SIGKILL, power loss) is taken over."""

    def __init__(self, directory: str | os.PathLike, command: str = ""):
        self.directory, self.command = Path(directory), command
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def _holder(self, fd: int) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        except OSError:
            return {}
        if text.isdigit():  # a bare pid
            return {"pid": int(text)}
        try:
            info = json.loads(text)
        except ValueError:
            return {}
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else {}

    def _busy(self, holder: dict) -> UserError:
        what = f" ({holder['command']})" if holder.get("command") else ""
        pid = holder.get("pid", "?")
        return UserError(f"{self.directory}: in use by another tunesmith run{what}, pid {pid}; wait for it to end "
                         f"or choose another output_dir (if pid {pid} is not tunesmith, delete {self.path})")

    def acquire(self) -> "RunLock":
        import fcntl

        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"{self.directory}: cannot write in the output directory ({e.strerror or e})") \
                    from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise self._busy(holder) from None
            except OSError:
                pass  # no flock on this file system: the pid check below still applies
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner removed the file between our open and flock: start over
                os.close(fd)
                continue
            holder = self._holder(fd)
            if holder and holder["pid"] != os.getpid() and holder.get("host", socket.gethostname()) == \
                    socket.gethostname() and _alive(holder["pid"], holder.get("started")):
                os.close(fd)
                raise self._busy(holder)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
                  "command": self.command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
            self._fd = fd
            # ours alone now: what an interrupted run left half-written here goes (also temp files without a
            # writer's pid, from older tunesmith versions: under the lock nobody else is writing them)
            for folder in [self.directory] + [c for c in self.directory.iterdir()
                                              if c.is_dir() and not c.name.startswith(".")]:
                clean_stale_temps(folder, legacy=True)
            return self
        raise UserError(f"{self.directory}: could not take the lock {self.path} (it keeps changing hands)")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- ownership

def read_owner(directory: str | os.PathLike) -> dict | None:
    """The owner record tunesmith wrote into ``directory`` (``{"command": ..., ...}``), or None."""
    try:
        info = json.loads((Path(directory) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("command"), str) else None


def write_owner(directory: str | os.PathLike, command: str, **info) -> None:
    from tunesmith.io import atomic_write_json

    atomic_write_json(Path(directory) / OWNER_FILE, {"command": command, **info})


def contents(directory: str | os.PathLike) -> list[str]:
    """The names in ``directory`` but tunesmith's own bookkeeping files (lock, owner record)."""
    directory = Path(directory)
    try:
        return sorted(p.name for p in directory.iterdir() if p.name not in _BOOKKEEPING)
    except FileNotFoundError:
        return []


def is_finished(directory: str | os.PathLike) -> bool:
    return (Path(directory) / FINISHED_FILE).is_file()


def check_replaceable(directory: str | os.PathLike, command: str) -> None:
    """Refuse a path tunesmith may not replace wholesale: a file, or a non-empty directory that tunesmith did not
    write for ``command``."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise UserError(f"{d}: is a file, not a directory")
    if d.is_dir() and contents(d):
        owner = read_owner(d)
        if owner is None or owner["command"] != command:
            made = f"holds a tunesmith {owner['command']} run" if owner else "was not written by tunesmith"
            raise UserError(f"{d}: not empty and {made}; choose a new or empty directory (tunesmith never deletes "
                            f"what it did not write)")


def staging_dir(directory: str | os.PathLike) -> Path:
    """A fresh, empty directory beside ``directory`` to build its new content in (then :func:`publish_dir`)."""
    d = Path(directory)
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=temp_prefix(d.name), suffix=".partial", dir=d.parent))
    except OSError as e:
        raise UserError(f"{d}: cannot write beside it ({e.strerror or e})") from None


def publish_dir(staging: str | os.PathLike, directory: str | os.PathLike, command: str, **info) -> Path:
    """Move a finished ``staging`` directory into place as ``directory``, marked as written by ``command``. An
    existing ``directory`` is replaced only if :func:`check_replaceable` allows it; the old one is renamed aside
    first and deleted last, so a crash leaves either the old or the new directory complete."""
    staging, d = Path(staging), Path(directory)
    write_owner(staging, command, **info)
    check_replaceable(d, command)
    old = None
    if d.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(d.name), suffix=".old", dir=d.parent))
        os.replace(d, old / d.name)
    os.replace(staging, d)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return d


# ---------------------------------------------------------------- a training run's directory

def barrier() -> None:
    """Wait for every process of a torch.distributed run (nothing in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@dataclasses.dataclass
class RunDir:
    """A training run's output directory, as :func:`open_run` found it. ``checkpoint``: resume from it (None: a
    fresh start). ``finished``: the directory holds this very run, finished; nothing is to be done or rewritten.

    A run of several stages (SPIN: generate, reference, train per iteration; DPO: reference, train) records each
    finished stage with its metrics in the directory's owner record (``tunesmith_run.json``, beside the run's
    fingerprint): :meth:`stage` reads a record, :meth:`finish_stage` writes one, and :meth:`stage_dir` hands a stage
    its folder. A rerun skips what is recorded; a stage's folder holds only what these very settings wrote."""

    directory: Path
    command: str
    fingerprint: Fingerprint
    checkpoint: str | None = None
    finished: bool = False
    lock: RunLock | None = None
    main: bool = True
    stages: dict = dataclasses.field(default_factory=dict)

    def checkpoint_callback(self):
        return checkpoint_callback(self.fingerprint)

    # ---- stages

    def stage(self, name: str) -> dict | None:
        """The metrics recorded when stage ``name`` finished under this run's settings, or None."""
        return self.stages.get("finished", {}).get(name)

    def stage_dir(self, name: str, folder: str | os.PathLike | None = None) -> Path:
        """The folder of stage ``name`` (``folder`` relative to the run directory; default ``name``), created. The
        first time the stage begins under these settings, whatever an earlier run with other settings left there
        is removed (by the main process; every process waits for it)."""
        d = self.directory / (folder or name)
        begun = self.stages.setdefault("begun", [])
        if name not in begun:
            if self.main:
                shutil.rmtree(d, ignore_errors=True)
                begun.append(name)
                self._write_stages()
            else:
                begun.append(name)
        if self.main:
            d.mkdir(parents=True, exist_ok=True)
        barrier()
        return d

    def finish_stage(self, name: str, metrics: dict) -> None:
        """Record stage ``name`` as finished with ``metrics`` (JSON-able), atomically, by the main process; every
        process waits for the record."""
        self.stages.setdefault("finished", {})[name] = metrics
        if self.main:
            self._write_stages()
        barrier()

    def _write_stages(self) -> None:
        write_owner(self.directory, self.command, fingerprint=self.fingerprint.digest, config=self.fingerprint.values,
                    stages=self.stages)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wants_resume(resume) -> bool | str:
    """True for "resume from the newest checkpoint", a path string for a given one, False for a fresh start."""
    if resume is None or resume is False:
        return False
    if resume is True:
        return True
    text = str(resume).strip()
    if text.lower() in ("", "false", "no", "none"):
        return False
    if text.lower() in ("true", "yes", "last"):
        return True
    return text


def open_run(output_dir: str | os.PathLike, command: str, fp: Fingerprint, resume=None, *, main: bool = True,
             continues: bool = False) -> RunDir:
    """Open a training run's output directory; see the module docstring. ``resume``: the recipe's
    ``resume_from_checkpoint`` (None/false, true/"last", or a checkpoint path). ``main``: whether this process
    writes (rank 0 under DDP; the others only read). ``continues``: a run made of stages (SPIN) that a rerun always
    continues: the directory of this command's run with the same settings is taken up where it stopped, one with
    other settings is refused (``resume`` does not apply). Raises :class:`UserError` with one line on every
    refusal."""
    d = Path(output_dir)
    if d.exists() and not d.is_dir():
        raise UserError(f"{d}: output_dir is a file, not a directory")
    lock = None
    if main:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{d}: cannot create output_dir ({e.strerror or e})") from None
        if not os.access(d, os.W_OK | os.X_OK):
            raise UserError(f"{d}: cannot write in output_dir (no write permission)")
        lock = RunLock(d, command).acquire()
    try:
        if lock is not None:  # ours alone now: what an interrupted run left half-written goes
            for folder in [d] + [c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")]:
                clean_stale_temps(folder, legacy=True)
        if continues:
            run = _continue(d, command, fp) if main else RunDir(d, command, fp, main=False)
        else:
            run = _resolve(d, command, fp, _wants_resume(resume), main)
        barrier()  # the main process has checked (and written) the directory
        if not main:  # the others read what the main process found
            owner = read_owner(d) or {}
            if owner.get("fingerprint") == fp.digest:
                run.stages = owner.get("stages") or {}
            run.finished = run.finished or (continues and is_finished(d))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock, run.main = lock, main
    return run


def _refuse_other_command(d: Path, owner: dict | None, command: str) -> None:
    if owner is not None and owner["command"] != command:
        state = "finished " if is_finished(d) else ""
        raise UserError(f"{d}: holds a {state}tunesmith {owner['command']} run, not a {command} run; choose "
                        f"another output_dir")


def _continue(d: Path, command: str, fp: Fingerprint) -> RunDir:
    owner = read_owner(d)
    _refuse_other_command(d, owner, command)
    if owner is None:
        if contents(d):
            raise UserError(f"{d}: not empty and holds no {command} run; choose an empty or new output_dir")
        write_owner(d, command, fingerprint=fp.digest, config=fp.values)
        return RunDir(d, command, fp)
    if owner.get("fingerprint") != fp.digest:
        diff = fp.differences(owner.get("config") or {})
        raise UserError(f"{d}: holds a different {command} run (config differs in {', '.join(diff) or '?'}); choose "
                        f"another output_dir")
    return RunDir(d, command, fp, finished=is_finished(d), stages=owner.get("stages") or {})


def _resolve(d: Path, command: str, fp: Fingerprint, resume: bool | str, main: bool) -> RunDir:
    if not main:  # other ranks only read what they need; the main process checks (and writes) the directory
        if is_finished(d) and resume:
            return RunDir(d, command, fp, finished=True)
        if not resume or is_finished(d):
            return RunDir(d, command, fp)
    owner = read_owner(d)
    _refuse_other_command(d, owner, command)
    same = owner is not None and owner.get("fingerprint") == fp.digest
    stages = (owner.get("stages") or {}) if same else {}
    if is_finished(d):
        if not resume:
            raise UserError(f"{d}: holds a finished run ({FINISHED_FILE}); choose another output_dir (tunesmith does "
                            f"not overwrite a finished run)")
        recorded = (owner or {}).get("fingerprint")
        if recorded is not None and recorded != fp.digest:
            diff = fp.differences((owner or {}).get("config") or {})
            raise UserError(f"{d}: holds a finished run with other settings (differs in {', '.join(diff) or '?'}); "
                            f"choose another output_dir")
        return RunDir(d, command, fp, finished=True)
    if not resume:
        done = newest_complete_checkpoint(d)
        if done is not None:
            raise UserError(f"{d}: holds checkpoints of an unfinished run (newest: {done.name}); set "
                            f"resume_from_checkpoint: true to continue it, or choose another output_dir")
        if owner is None and contents(d):
            raise UserError(f"{d}: not empty and not a tunesmith run directory; choose a new or empty output_dir")
        if main:
            write_owner(d, command, fingerprint=fp.digest, config=fp.values, **({"stages": stages} if stages else {}))
        return RunDir(d, command, fp, stages=stages)
    if resume is True:
        ckpt = newest_complete_checkpoint(d)
        if ckpt is None:
            raise UserError(f"resume_from_checkpoint: no complete checkpoint in {d} to resume from (drop "
                            f"resume_from_checkpoint to start afresh)")
    else:
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise UserError(f"resume_from_checkpoint: {ckpt} is not a checkpoint directory")
    check_checkpoint(ckpt, fp)
    return RunDir(d, command, fp, checkpoint=str(ckpt), stages=stages)
