"""Small helpers for people-facing output: one-line errors, atomic JSON/text writes, a lock for one writer per
output file, Markdown tables, hand-written SVG charts.

Used by evaluate.py, probe.py, retrieve.py and reproduce.py. No plotting dependency: the charts are plain SVG
strings (valid XML, all text escaped) that any browser or GitHub renders.

    python report.py metrics.json [--svg chart.svg]   # Markdown table (+ bar chart) of a {row: {col: num}} file
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import stat
import sys
import tempfile
from xml.sax.saxutils import escape

# Okabe-Ito palette: distinguishable under the common forms of colour blindness.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


# ----------------------------------------------------------------------------- scripts

# What bad input, a missing or unwritable file, or a NaN raises. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def exit_on_error(main):
    """Run a script's main(); a user error ends it with one line, 'script.py: error: <message>', and status 1.
    Every product script's __main__ goes through here, so all report bad input the same way."""
    try:
        return main()
    except USER_ERRORS as e:
        message = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {' '.join(message.split())}")


def flag(dest):
    """The command-line spelling of an argparse dest: max_len -> --max-len."""
    return "--" + dest.replace("_", "-")


def check_flags(args, minimums=None, positive=()):
    """ValueError naming the first flag out of range: below its minimum ({dest: lowest allowed}) or, for the
    dests in `positive`, not a finite number > 0. A flag left at None is not checked."""
    for dest, lowest in (minimums or {}).items():
        value = getattr(args, dest)
        if value is not None and value < lowest:
            raise ValueError(f"{flag(dest)} must be >= {lowest}, got {value}")
    for dest in positive:
        value = getattr(args, dest)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag(dest)} must be a finite number > 0, got {value}")


def settings_of(args):
    """The parsed flags as recorded in a result's "settings" (without the subcommand and its function)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "run")}


# ----------------------------------------------------------------------------- files

def _new_file_mode(path):
    """The permissions a file written at `path` should get: those of the file it replaces, else what open() would
    give a new file (0o666 less the umask). mkstemp alone makes every file 0o600, unreadable to the group."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # the only portable way to read the umask is to set it; put it straight back
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path, write, mode="wb"):
    """Call write(file) on a temp file next to `path`, fsync, then rename it over `path`: a crash mid-write leaves
    the old file (or none), never half a file. The one atomic writer of the project. The file gets the mode a
    plain open() would give it (or keeps the one of the file it replaces). An OSError while writing (a read-only
    folder, a full disk) names `path`, not the temp file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    prefix = os.path.join(folder, f".{os.path.basename(path)}.")
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(prefix), suffix=".tmp")
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            os.fchmod(fd, _new_file_mode(path))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and (e.filename is None or str(e.filename).startswith(prefix)):
            raise OSError(e.errno, e.strerror, path) from e
        raise


def _open_lock(lock_path):
    """A descriptor of PATH.lock, never through a symlink: one planted there would have the pid written into the
    file it points at (the lock-file attack), so a lock path that is a link is refused, not followed."""
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if os.path.islink(lock_path):
            raise OSError(e.errno, "is a symbolic link; a lock file must be a plain file (remove the link)",
                          lock_path) from None
        raise


@contextlib.contextmanager
def exclusive(path):
    """Hold a lock on PATH for the body: `with exclusive(out): ...append to out...`. A second process (or a
    second `with` in this one) that asks while it is held gets BlockingIOError 'PATH is being written by another
    process (pid N)' at once, without waiting, so two writers never interleave rows in one file.

    The lock is an flock on PATH.lock, which holds the holder's pid and is removed on exit. flock is released
    by the kernel when a process dies, so a killed run leaves no stale lock, only a harmless PATH.lock file."""
    path = os.fspath(path)
    lock_path = f"{path}.lock"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        fd = _open_lock(lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise BlockingIOError(f"{path} is being written by another process (pid {holder})") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        # The holder removed PATH.lock between our open and our flock: we hold a lock nobody else can see.
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # someone deleted it by hand
            os.unlink(lock_path)  # before the release: whoever opened it meanwhile sees it gone and retries
        os.close(fd)


def _identity(path):
    """Device and inode of an existing file or folder (so links and other spellings compare equal), else the
    absolute path it would be created at."""
    if os.path.exists(path):
        st = os.stat(path)
        return st.st_dev, st.st_ino
    return os.path.realpath(path)


def _inputs_taken(inputs):
    """({identity: 'WHAT PATH'} of every input file, including each file of an input folder such as a model or
    adapter directory; [(real path, 'WHAT PATH')] of the input folders)."""
    taken, folders = {}, []
    for what, path in inputs:
        if path is None or not os.path.exists(path):
            continue  # a hub id, an embedded model name, or a file the command will report missing
        taken[_identity(path)] = f"{what} {path}"
        if os.path.isdir(path):
            folders.append((os.path.realpath(path), f"{what} {path}"))
            for inner, _, names in os.walk(path):
                taken.update({_identity(os.path.join(inner, n)): f"{what} {path}" for n in names})
    return taken, folders


def check_outputs(outputs, inputs, folders=()):
    """Refuse, before anything is written, an output that is an input, a file of an input folder (a model, an
    adapter directory), inside an input folder, or another output; and a file output that is an existing folder
    or a folder output that is an existing file. The one guard of every writing command.

    outputs: (what, path) pairs of files to write; folders: (what, path) pairs of folders to write into;
    inputs: (what, path) pairs of files or folders read. `what` names the flag or the role in the message; a
    path of None is skipped."""
    taken, input_folders = _inputs_taken(inputs)
    for (what, path), is_folder in [*((o, False) for o in outputs), *((f, True) for f in folders)]:
        if path is None:
            continue
        if not is_folder and os.path.isdir(path):
            raise ValueError(f"{what} {path}: is a folder; give a file path")
        if is_folder and os.path.isfile(path):
            raise ValueError(f"{what} {path}: is a file; give a folder")
        identity = _identity(path)
        if identity in taken:
            raise ValueError(f"{what} {path} is also {taken[identity]}: refusing to overwrite it")
        real = os.path.realpath(path)
        for folder, owner in input_folders:
            if real.startswith(folder + os.sep):
                raise ValueError(f"{what} {path} is inside the input folder {owner}: refusing to write into it; "
                                 "give a path outside it")
        taken[identity] = f"{what} {path}"


def write_text(path, text):
    """Write text atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def _strict_json(obj):
    # NaN/inf are not JSON; write them as null so every reader (jq, JS, other languages) accepts the file.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def write_json(path, obj):
    """Atomically write obj as indented UTF-8 JSON (non-finite floats become null)."""
    write_text(path, json.dumps(_strict_json(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- markdown

def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers, rows, align=None):
    """GitHub Markdown table. Floats print with 3 decimals; align is a string/list of 'l', 'r', 'c' per column
    (default: right for columns whose cells are all numbers, left otherwise)."""
    if any(len(r) != len(headers) for r in rows) or (align is not None and len(align) != len(headers)):
        raise ValueError(f"markdown_table: every row and align must have {len(headers)} columns")
    if align is None:
        align = ["r" if rows and all(isinstance(r[i], (int, float)) for r in rows) else "l"
                 for i in range(len(headers))]
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "|".join(rule[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- svg primitives

def nice_ticks(lo, hi, n=5):
    """About n round tick values (steps of 1, 2, 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    t = first
    while t < hi + step * 1e-9 or len(ticks) < 2:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def _fmt_tick(v):
    return f"{v:.6g}"


def _text(x, y, s, size=12, anchor="middle", rotate=None, weight=None):
    attrs = f'x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"'
    if rotate is not None:
        attrs += f' transform="rotate({rotate} {x:.1f} {y:.1f})"'
    if weight:
        attrs += f' font-weight="{weight}"'
    return f"<text {attrs}>{escape(str(s))}</text>"


class _Frame:
    """A chart canvas: maps data coordinates to pixels and draws title, axes, ticks, grid and legend."""

    def __init__(self, width, title, xlabel, ylabel, y_ticks, x_ticks=None, height=380, bottom=70):
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = 70, 20, 62, bottom
        self.y_ticks, self.x_ticks = y_ticks, x_ticks
        self.parts = [_text(width / 2, 24, title, size=16, weight="bold")]
        self.xlabel, self.ylabel = xlabel, ylabel

    @property
    def plot_w(self):
        return self.w - self.left - self.right

    @property
    def plot_h(self):
        return self.h - self.top - self.bottom

    def py(self, y):
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return self.top + self.plot_h * (1 - (y - lo) / (hi - lo))

    def px(self, x):
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.left + self.plot_w * (x - lo) / (hi - lo)

    def axes(self):
        x0, x1, y1 = self.left, self.left + self.plot_w, self.top + self.plot_h
        for t in self.y_ticks:
            y = self.py(t)
            self.parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/>')
            self.parts.append(_text(x0 - 6, y + 4, _fmt_tick(t), size=11, anchor="end"))
        if self.x_ticks is not None:
            for t in self.x_ticks:
                x = self.px(t)
                self.parts.append(f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y1 + 5}" stroke="#333"/>')
                self.parts.append(_text(x, y1 + 18, _fmt_tick(t), size=11))
        self.parts.append(f'<line x1="{x0}" y1="{self.top}" x2="{x0}" y2="{y1}" stroke="#333"/>')
        zero = self.py(0) if self.y_ticks[0] <= 0 <= self.y_ticks[-1] else y1
        self.parts.append(f'<line x1="{x0}" y1="{zero:.1f}" x2="{x1}" y2="{zero:.1f}" stroke="#333"/>')
        self.parts.append(_text(18, self.top + self.plot_h / 2, self.ylabel, size=13, rotate=-90))
        if self.xlabel:
            self.parts.append(_text(x0 + self.plot_w / 2, self.h - 10, self.xlabel, size=13))

    def legend(self, names, marker="rect", colors=PALETTE):
        # One row between the title and the plot, so it never covers data.
        x, y = self.left, 36
        for i, name in enumerate(names):
            color = colors[i % len(colors)]
            if marker == "rect":
                self.parts.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{color}"/>')
            else:
                self.parts.append(f'<line x1="{x}" y1="{y + 6}" x2="{x + 12}" y2="{y + 6}" '
                                  f'stroke="{color}" stroke-width="3"/>')
            self.parts.append(_text(x + 18, y + 11, name, size=12, anchor="start"))
            x += 18 + 7 * len(str(name)) + 16  # about 7 px per character at 12 px

    def svg(self):
        body = "\n".join(self.parts)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
                f'viewBox="0 0 {self.w} {self.h}" font-family="sans-serif">\n'
                f'<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


def finite(values):
    """The values that are numbers (None and NaN/inf left out)."""
    return [v for v in values if v is not None and math.isfinite(v)]


def _ticks(values, include_zero=True, pad=0.0):
    """Round ticks spanning the finite values (and zero, for bars); pad widens the span by that fraction on
    each side so points and their labels do not sit on the axes."""
    vals = finite(values) or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    if include_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return nice_ticks(lo - pad * (hi - lo), hi + pad * (hi - lo))


# ----------------------------------------------------------------------------- charts

def bar_chart_svg(categories, series, title, ylabel, errors=None):
    """Grouped bar chart: one group per category, one coloured bar per series (dict name -> values).
    Missing/NaN values leave a gap. Each bar carries a <title> tooltip with its exact value. errors: optional
    {series name: [(lo, hi) or None per category]}, drawn as an interval (whisker with caps) on each bar."""
    names, errors = list(series), errors or {}
    for name in names:
        if len(series[name]) != len(categories) or len(errors.get(name, categories)) != len(categories):
            raise ValueError(f"bar_chart_svg: series {name!r} has {len(series[name])} values, "
                             f"expected {len(categories)}")
    rotate = any(len(str(c)) > 6 for c in categories)
    group_w = max(36, 14 * len(names) + 16)
    ends = [x for n in names for ci in errors.get(n, []) if ci for x in ci]
    frame = _Frame(70 + 20 + group_w * max(len(categories), 1) + 10, title, "", ylabel,
                   _ticks([v for n in names for v in series[n]] + ends), bottom=110 if rotate else 60)
    frame.axes()
    bar_w = (group_w - 12) / max(len(names), 1)
    base = frame.py(0.0)  # bars grow from zero (the y range always includes it), up or down
    for ci, cat in enumerate(categories):
        gx = frame.left + 5 + ci * group_w
        for si, name in enumerate(names):
            v = series[name][ci]
            if v is None or not math.isfinite(v):
                continue
            y = frame.py(v)
            top, height = min(y, base), abs(base - y)
            frame.parts.append(
                f'<rect x="{gx + 6 + si * bar_w:.1f}" y="{top:.1f}" width="{bar_w - 1:.1f}" height="{height:.1f}" '
                f'fill="{PALETTE[si % len(PALETTE)]}"><title>{escape(f"{name} {cat}: {v:.4g}")}</title></rect>')
            interval = errors[name][ci] if name in errors else None
            if interval and all(x is not None and math.isfinite(x) for x in interval):
                frame.parts.append(_whisker(gx + 6 + si * bar_w + (bar_w - 1) / 2, *map(frame.py, interval)))
        cx, cy = gx + group_w / 2, frame.top + frame.plot_h + 18
        if rotate:
            frame.parts.append(_text(cx, cy, cat, size=12, anchor="end", rotate=-45))
        else:
            frame.parts.append(_text(cx, cy, cat, size=12))
    frame.legend(names)
    return frame.svg()


def _whisker(x, y_lo, y_hi, cap=3):
    """An interval drawn at x from y_lo to y_hi (pixels), with short caps at both ends."""
    return (f'<path d="M{x - cap:.1f},{y_lo:.1f}H{x + cap:.1f}M{x:.1f},{y_lo:.1f}V{y_hi:.1f}M{x - cap:.1f},'
            f'{y_hi:.1f}H{x + cap:.1f}" stroke="#000" stroke-width="1" fill="none" class="interval"/>')


def line_chart_svg(x, series, title, xlabel, ylabel):
    """Line chart over numeric x: one polyline with point markers per series (dict name -> values)."""
    names = list(series)
    frame = _Frame(640, title, xlabel, ylabel,
                   _ticks([v for n in names for v in series[n]], include_zero=False, pad=0.05),
                   x_ticks=_ticks(x, include_zero=False))
    frame.axes()
    for si, name in enumerate(names):
        color = PALETTE[si % len(PALETTE)]
        pts = [(frame.px(a), frame.py(b)) for a, b in zip(x, series[name])
               if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
        if len(pts) > 1:
            coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            frame.parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        frame.parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts]
    frame.legend(names, marker="line")
    return frame.svg()


def linear_fit(xs, ys):
    """Least-squares line y = slope * x + intercept and Pearson r (nan when undefined)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((a - mx) ** 2 for a in xs)
    syy = sum((b - my) ** 2 for b in ys)
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    slope = sxy / sxx if sxx else float("nan")
    r = sxy / math.sqrt(sxx * syy) if sxx and syy else float("nan")
    return slope, my - slope * mx, r


def scatter_svg(xs, ys, labels, title, xlabel, ylabel, fit=False):
    """Scatter plot with a text label beside each point; fit=True adds the least-squares line and its r."""
    if not (len(xs) == len(ys) == len(labels)):
        raise ValueError("scatter_svg: xs, ys and labels must have the same length")
    x_ticks = _ticks(xs, include_zero=False, pad=0.05)
    frame = _Frame(640, title, xlabel, ylabel, _ticks(ys, include_zero=False, pad=0.05), x_ticks=x_ticks)
    frame.axes()
    for a, b, lab in zip(xs, ys, labels):
        frame.parts.append(f'<circle cx="{frame.px(a):.1f}" cy="{frame.py(b):.1f}" r="4" fill="{PALETTE[0]}">'
                           f'<title>{escape(f"{lab}: ({a:.4g}, {b:.4g})")}</title></circle>')
        frame.parts.append(_text(frame.px(a) + 6, frame.py(b) - 6, lab, size=11, anchor="start"))
    if fit and len(xs) >= 2:
        slope, intercept, r = linear_fit(xs, ys)
        if math.isfinite(slope):
            lo, hi = x_ticks[0], x_ticks[-1]
            y_lo, y_hi = frame.y_ticks[0], frame.y_ticks[-1]
            # Clip the fitted line to the plot box so it never draws over the axes.
            xa, xb = lo, hi
            if slope:  # keep only the x range where the line stays inside [y_lo, y_hi]
                xs_at = sorted((y - intercept) / slope for y in (y_lo, y_hi))
                xa, xb = max(lo, xs_at[0]), min(hi, xs_at[1])
            ya, yb = slope * xa + intercept, slope * xb + intercept
            frame.parts.append(f'<line x1="{frame.px(xa):.1f}" y1="{frame.py(ya):.1f}" x2="{frame.px(xb):.1f}" '
                               f'y2="{frame.py(yb):.1f}" stroke="{PALETTE[3]}" stroke-width="2" '
                               f'stroke-dasharray="6 4"/>')
            frame.legend([f"fit: y = {slope:.3g}x + {intercept:.3g}, r = {r:.3f}"], marker="line",
                         colors=[PALETTE[3]])
    return frame.svg()


# ----------------------------------------------------------------------------- cli

def main(argv=None):
    p = argparse.ArgumentParser(
        description="Render a metrics JSON file as a Markdown table (and optionally a grouped bar chart). "
                    "The file must map row names to {column: number}, e.g. {\"en\": {\"emt\": 0.4}, ...} "
                    "(the per-language blocks evaluate.py writes). Mostly used as a library by evaluate.py, "
                    "probe.py, retrieve.py and reproduce.py.")
    p.add_argument("json_file", help="JSON object: row name -> object of column name -> number")
    p.add_argument("--select", metavar="KEY[.KEY]",
                   help="dotted path to the table inside the file, e.g. 'metrics' (evaluate.py single run) or "
                        "'after' (evaluate.py --before/--after)")
    p.add_argument("--svg", metavar="OUT.svg", help="also write a grouped bar chart (one bar per column) here")
    p.add_argument("--columns", nargs="+", metavar="COL",
                   help="columns to show, in order (default: all numeric columns of the first row)")
    args = p.parse_args(argv)
    check_outputs([("--svg", args.svg)], [("the metrics file", args.json_file)])
    with open(args.json_file, encoding="utf-8") as f:
        table = json.load(f)
    for key in args.select.split(".") if args.select else []:
        if not isinstance(table, dict) or key not in table:
            raise ValueError(f"{args.json_file}: no field '{key}' on the path '{args.select}'")
        table = table[key]
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"{args.json_file}: expected an object of row name -> object of column -> number")
    first = next(iter(table.values()), {})
    columns = args.columns or [k for k, v in first.items() if isinstance(v, (int, float))]
    rows = [[name] + [vals.get(c) for c in columns] for name, vals in table.items()]
    print(markdown_table(["row"] + columns, rows, align=["l"] + ["r"] * len(columns)), end="")
    if args.svg:
        series = {c: [float("nan") if vals.get(c) is None else vals[c] for vals in table.values()] for c in columns}
        write_text(args.svg, bar_chart_svg(list(table), series, os.path.basename(args.json_file), "value"))
        print(f"wrote {args.svg}")


if __name__ == "__main__":
    exit_on_error(main)
