"""Training curves overlaid in one PNG, drawn with Pillow.

Pillow is already a project dependency (requirements.txt) and matplotlib is not; a few
benchmark pictures do not justify a plotting library, so this draws the axes, ticks,
lines and legend itself. One panel per entry of `panels`, stacked vertically.

Each curve is drawn twice: the per-step values as a thin pale line (the batch-to-batch
noise of a short run is larger than the differences a precision check looks for) and a
running mean as a thick line in the full colour, which is what the eye should compare.
Non-finite values break the line and are named in the legend, so a NaN run is visible
rather than silently dropped.
"""
import math

from PIL import Image, ImageDraw, ImageFont

# Distinguishable on white and for the common red-green colour deficiencies
# (blue / vermillion / bluish green / reddish purple of the Okabe-Ito palette).
COLOURS = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233))
WIDTH, PANEL_H, HEADER_H = 1100, 460, 64
LEFT, RIGHT, TOP, BOTTOM = 90, 24, 44, 62  # plot-area margins inside a panel


def nice_ticks(low, high, count=6):
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k) spanning [low, high], and the
    number of decimals that prints them without clutter."""
    if not high > low:
        pad = abs(low) * 0.05 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * 0.999)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    ticks = [i * step for i in range(first, last + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1  # 2.5 x 10^k needs one more digit
    return ticks, decimals


def running_mean(values, window):
    """Mean of the last `window` finite values at each step (fewer at the start);
    None where the value itself is not finite."""
    out, recent = [], []
    for v in values:
        if not math.isfinite(v):
            out.append(None)
            recent = []
            continue
        recent = (recent + [v])[-window:]
        out.append(sum(recent) / len(recent))
    return out


def _font(size):
    return ImageFont.load_default(size=size)


def _pale(colour, keep=0.35):
    return tuple(int(255 - (255 - c) * keep) for c in colour)


def _segments(points):
    """Runs of consecutive non-None points, for lines that break at non-finite values."""
    run = []
    for p in points:
        if p is None:
            if len(run) > 1:
                yield run
            run = []
        else:
            run.append(p)
    if len(run) > 1:
        yield run


def _legend_corner(box, size, points):
    """The plot corner whose legend-sized rectangle covers the fewest curve points."""
    x0, y0, x1, y1 = box
    w, h = size
    corners = [(x1 - w - 8, y0 + 8), (x0 + 8, y0 + 8), (x1 - w - 8, y1 - h - 8),
               (x0 + 8, y1 - h - 8)]

    def covered(corner):
        cx, cy = corner
        return sum(cx <= px <= cx + w and cy <= py <= cy + h for px, py in points)
    return min(corners, key=covered)


def draw_panel(image, origin_y, subtitle, curves, x_label, y_label, smooth):
    """One chart: `curves` is a list of (label, values) sharing the step axis."""
    draw = ImageDraw.Draw(image)
    small, medium = _font(15), _font(17)
    box = (LEFT, origin_y + TOP, WIDTH - RIGHT, origin_y + PANEL_H - BOTTOM)
    x0, y0, x1, y1 = box
    draw.text((LEFT, origin_y + 12), subtitle, fill=(0, 0, 0), font=medium)

    steps = max(len(v) for _, v in curves)
    finite = [v for _, values in curves for v in values if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    yticks, ydec = nice_ticks(low, high)
    xticks, _ = nice_ticks(0, max(steps - 1, 1), count=9)
    xticks = [int(t) for t in xticks if float(t).is_integer()]
    ylo, yhi, xlo, xhi = yticks[0], yticks[-1], xticks[0], xticks[-1]

    def at(step, value):
        return (x0 + (step - xlo) / (xhi - xlo) * (x1 - x0),
                y1 - (value - ylo) / (yhi - ylo) * (y1 - y0))

    for t in yticks:  # grid and y labels
        _, y = at(xlo, t)
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.line([(x0 - 5, y), (x0, y)], fill=(0, 0, 0))
        draw.text((x0 - 8, y), f'{t:.{ydec}f}', fill=(0, 0, 0), font=small, anchor='rm')
    for t in xticks:
        x, _ = at(t, ylo)
        draw.line([(x, y0), (x, y1)], fill=(235, 235, 235))
        draw.line([(x, y1), (x, y1 + 5)], fill=(0, 0, 0))
        draw.text((x, y1 + 8), str(t), fill=(0, 0, 0), font=small, anchor='mt')
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text(((x0 + x1) / 2, y1 + 34), x_label, fill=(0, 0, 0), font=medium, anchor='mt')
    label_img = Image.new('RGB', (200, 24), 'white')
    ImageDraw.Draw(label_img).text((100, 12), y_label, fill=(0, 0, 0), font=medium,
                                   anchor='mm')
    label_img = label_img.rotate(90, expand=True)
    image.paste(label_img, (6, int((y0 + y1) / 2 - 100)))

    all_points, legend = [], []
    for i, (label, values) in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        raw = [at(s, v) if math.isfinite(v) else None for s, v in enumerate(values)]
        mean = [at(s, v) if v is not None else None
                for s, v in enumerate(running_mean(values, smooth))]
        for run in _segments(raw):
            draw.line(run, fill=_pale(colour), width=1)
        all_points += [p for p in raw + mean if p is not None]
        legend.append((label, colour, mean))
        bad = [s for s, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            legend[-1] = (f'{label} (non-finite from step {bad[0]})', colour, mean)
    for _, colour, mean in legend:  # means on top of every pale line
        for run in _segments(mean):
            draw.line(run, fill=colour, width=3, joint='curve')

    rows = [(text, colour) for text, colour, _ in legend]
    note = f'thin: per step, thick: {smooth}-step running mean'
    width = max(draw.textlength(t, font=small) for t, _ in rows + [(note, None)]) + 48
    height = 24 * len(rows) + 30
    lx, ly = _legend_corner(box, (width, height), all_points)
    draw.rectangle((lx, ly, lx + width, ly + height), fill=(255, 255, 255),
                   outline=(120, 120, 120))
    for j, (text, colour) in enumerate(rows):
        yy = ly + 14 + 24 * j
        draw.line([(lx + 8, yy), (lx + 36, yy)], fill=colour, width=4)
        draw.text((lx + 42, yy), text, fill=(0, 0, 0), font=small, anchor='lm')
    draw.text((lx + 8, ly + 14 + 24 * len(rows)), note, fill=(90, 90, 90), font=small,
              anchor='lm')


def save_curve_panels(path, title, panels, x_label='step', y_label='loss', smooth=10):
    """Write `panels` ([(subtitle, [(label, values), ...]), ...]) as one PNG at `path`."""
    image = Image.new('RGB', (WIDTH, HEADER_H + PANEL_H * len(panels)), 'white')
    draw = ImageDraw.Draw(image)
    lines = title.split('\n')
    for k, line in enumerate(lines):
        draw.text((WIDTH / 2, 12 + 24 * k), line, fill=(0, 0, 0),
                  font=_font(20 if k == 0 else 16), anchor='mt')
    for i, (subtitle, curves) in enumerate(panels):
        draw_panel(image, HEADER_H + PANEL_H * i, subtitle, curves, x_label, y_label, smooth)
    image.save(path)
    return path
