"""The output size of a window sliding over an NHWC map: what the convolutions and pools
of every kernel path (XLA, im2col, oneDNN) share."""


def output_hw(x_shape, window_hw, strides, padding):
    """(height, width) out of an NHWC input with this window, strides and ((top, bottom),
    (left, right)) padding."""
    return tuple((x_shape[1 + a] + sum(padding[a]) - window_hw[a]) // strides[a] + 1
                 for a in (0, 1))
