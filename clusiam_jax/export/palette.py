"""The clusters' colors on maps, QuPath tiles and the atlas: greedy farthest points in CIEDE2000
over an sRGB grid, away from H&E's own colors and hues, so no overlay reads as stain."""
import functools

import numpy as np


def _srgb_to_lab(rgb):
    """CIELAB (D65) of sRGB colors in [0, 1], shape [..., 3]."""
    rgb = np.asarray(rgb, np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e_2000(lab1, lab2):
    """CIEDE2000 difference of CIELAB colors [..., 3] (Sharma, Wu & Dalal 2005): unlike CIE76
    it does not overrate differences among saturated blues."""
    lab1, lab2 = np.broadcast_arrays(np.asarray(lab1, np.float64), np.asarray(lab2, np.float64))
    l1, a1, b1 = np.moveaxis(lab1, -1, 0)
    l2, a2, b2 = np.moveaxis(lab2, -1, 0)
    c7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2) ** 7
    g = 0.5 * (1 - np.sqrt(c7 / (c7 + 25.0 ** 7)))
    a1, a2 = (1 + g) * a1, (1 + g) * a2
    c1, c2 = np.hypot(a1, b1), np.hypot(a2, b2)
    h1, h2 = np.degrees(np.arctan2(b1, a1)) % 360, np.degrees(np.arctan2(b2, a2)) % 360
    grey = c1 * c2 == 0
    dh = h2 - h1
    dh = np.where(grey, 0, np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh)))
    d_hue = 2 * np.sqrt(c1 * c2) * np.sin(np.radians(dh) / 2)
    l_mean, c_mean, h_sum = (l1 + l2) / 2, (c1 + c2) / 2, h1 + h2
    h_mean = np.where(grey, h_sum, np.where(np.abs(h1 - h2) > 180,
                                           np.where(h_sum < 360, h_sum + 360, h_sum - 360),
                                           h_sum) / 2)
    t = (1 - 0.17 * np.cos(np.radians(h_mean - 30)) + 0.24 * np.cos(np.radians(2 * h_mean))
         + 0.32 * np.cos(np.radians(3 * h_mean + 6)) - 0.20 * np.cos(np.radians(4 * h_mean - 63)))
    c_mean7 = c_mean ** 7
    r_t = (-np.sin(np.radians(60 * np.exp(-(((h_mean - 275) / 25) ** 2))))
           * 2 * np.sqrt(c_mean7 / (c_mean7 + 25.0 ** 7)))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c, s_h = 1 + 0.045 * c_mean, 1 + 0.015 * c_mean * t
    d_l, d_c, d_h = (l2 - l1) / s_l, (c2 - c1) / s_c, d_hue / s_h
    return np.sqrt(d_l ** 2 + d_c ** 2 + d_h ** 2 + r_t * d_c * d_h)


# H&E itself, which no cluster color may come near: haematoxylin (dark and typical),
# eosin (deep and typical), their lavender mixture, pale eosin and the white glass.
HE_REFERENCES = np.array([[80, 60, 140], [50, 30, 100], [230, 150, 190], [200, 100, 170],
                          [160, 110, 170], [245, 215, 235], [255, 255, 255]], np.uint8)
HE_MIN_DELTA_E = 20.0
# CIELAB hues (degrees) no cluster color has: H&E's purple to pink, with a margin.
HE_HUES = (285.0, 20.0)
# Candidates: visible over tissue and white, not greyish (grey reads as "no cluster").
_GRID_LEVELS, _LIGHTNESS, _MIN_CHROMA = 18, (30.0, 88.0), 30.0


def in_he_hues(lab):
    """bool [...]: whether CIELAB colors have a hue of H&E (HE_HUES)."""
    hue = np.degrees(np.arctan2(lab[..., 2], lab[..., 1])) % 360
    return (hue >= HE_HUES[0]) | (hue < HE_HUES[1])


@functools.lru_cache(maxsize=8)
def _palette(n):
    # Greedy farthest-first from the H&E references; ties go to the first candidate, so a
    # prefix of a longer palette is the shorter palette.
    levels = np.linspace(0.0, 1.0, _GRID_LEVELS)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing='ij'), -1).reshape(-1, 3)
    lab = _srgb_to_lab(grid)
    to_stain = delta_e_2000(lab[:, None], _srgb_to_lab(HE_REFERENCES / 255.0)[None]).min(1)
    keep = ((lab[:, 0] > _LIGHTNESS[0]) & (lab[:, 0] < _LIGHTNESS[1])
            & (np.hypot(lab[:, 1], lab[:, 2]) > _MIN_CHROMA) & (to_stain > HE_MIN_DELTA_E)
            & ~in_he_hues(lab))
    grid, lab, dist = grid[keep], lab[keep], to_stain[keep]
    chosen = []
    for _ in range(min(n, grid.shape[0])):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, delta_e_2000(lab, lab[nxt]))
    # More clusters than candidates: the colors repeat.
    colors = np.resize(np.round(grid[chosen] * 255).astype(np.uint8), (n, 3))
    colors.setflags(write=False)
    return colors


def cluster_palette(n=128):
    """[n, 3] uint8 colors, most distinct first (Glasbey's would fall on H&E's pinks)."""
    return np.array(_palette(int(n)))


def palette_for(k):
    """The first `k` colors of the 128 (or more) every map, tile and atlas shares."""
    return cluster_palette(max(int(k), 128))[:k]
