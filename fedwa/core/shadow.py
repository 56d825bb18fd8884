"""Shadow weights of the Weight Augmentation Strategy (WAS).

WAS (Zhuang et al., "Weight Augmentation Strategy", arXiv 2405.19590) augments the *weights*
of a network rather than its inputs. Every selected convolution keeps its plain weight ``W``
and gains one learnable scalar ``a``. During training its forward pass uses the *shadow weight*

    SW = a * T(W),

where ``T`` is a random transform of the kernels, redrawn at every forward pass. Gradients
flow through ``T`` into ``W`` and into ``a``, so the plain weight learns to work under a whole
family of perturbed kernels. Two inference modes follow the paper's accuracy-oriented and
desire-oriented modes:

* ``"plain"`` (accuracy-oriented, default): the evaluated conv uses ``W`` exactly.
* ``"shadow"`` (desire-oriented, the authors' "deploy 1"): the evaluated conv computes
  ``a * T(W)`` with a freshly drawn random ``T`` at every forward pass, exactly as in
  training. Predictions are then random: they depend on the layer's generator (reseed it,
  :func:`reseed_shadow`, before an evaluation to repeat it) and on how the test set is cut
  into batches, since one ``T`` is drawn per forward pass, i.e. per evaluation batch.

The scale ``a`` is initialised to 1 (``scale_init="one"``, the default) or from ``U(0, 1)``
(``"uniform"``, the authors' code draws it with ``torch.rand``). Under a BatchNorm in train
mode right after the conv (every conv of this project's models), ``a`` cancels:
``BN(a z) = BN(z)`` for ``a > 0`` up to BN's ``eps``, so the loss barely depends on ``a`` and
it hardly learns; it still scales what the BN's running statistics see. That is why 1 is the
default here, a documented departure: the BN layers learn their running statistics on
``a * T(W) x`` during training, so the accuracy-oriented mode (plain ``W``, ``inference =
"plain"``) feeds them inputs ``1 / a`` times larger than the statistics describe. With
``a = 1`` the two agree (``T(W) = W`` in most draws); with ``a ~ U(0, 1)`` they agree only
in the desire-oriented mode, which is how the authors' script evaluates (its default forward
runs the shadow path). See :class:`ShadowConv2d`.

Three transforms ``T`` are implemented, all differentiable in ``W``:

* ``"reference"`` (default): the authors' code, ``torchvision.transforms.RandomResizedCrop``
  with output size ``(k_h, k_w)``, area fraction ``U(0.8, 1.0)`` and aspect ratio
  log-uniform in ``[3/4, 4/3]``, applied to the weight tensor ``[out, in, k_h, k_w]`` as an
  image. The crop has integer size and position (:func:`sample_crop`) and is resized back
  bilinearly (:func:`resized_crop`). For a ``3 x 3`` kernel the crop is the whole kernel,
  ``T(W) = W``, in about 84% of the draws; otherwise it is a ``2 x 3`` or ``3 x 2`` crop
  stretched back to ``3 x 3``.
* ``"resize-crop"``: a square crop (aspect ratio 1) covering a fraction ``s ~ U(0.8, 1.0)``
  of the kernel's area at a uniformly random *sub-pixel* position, resized back to
  ``k_h x k_w`` with bilinear interpolation: a perturbation at every draw.
* ``"translate"``: a shift of up to 30% of the kernel size along each axis (independent
  uniform draws), bilinear, with zeros shifted in.

The last two are affine resamplings of each kernel seen as a tiny image
(``torch.nn.functional.affine_grid`` + ``grid_sample`` with ``align_corners=False``).

One random transform is drawn per forward pass and shared by every kernel of the layer (all
``out x in`` channel pairs), as the authors' code does by cropping the whole weight tensor at
once; it also keeps the cost at one small resampling per layer and makes the transform of a
layer a single reproducible event of its generator. ``1 x 1`` kernels have nothing to crop or
shift, so for them ``T`` is the identity and ``SW = a * W``.

Each :class:`ShadowConv2d` owns a seeded :class:`torch.Generator`, so the random transforms
are reproducible and independent of the global torch RNG (data shuffling, dropout).

Example
-------
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False))
>>> model = add_shadow_weights(model, seed=0)
>>> sorted(model.state_dict())
['0.shadow_scale', '0.weight']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The kernel transforms ``T`` a :class:`ShadowConv2d` can train through.
TRANSFORMS = ("reference", "resize-crop", "translate")
#: The transforms that are affine resamplings (:class:`AffineParams`, :func:`sample_affine`).
AFFINE_TRANSFORMS = ("resize-crop", "translate")
#: What a :class:`ShadowConv2d` uses in eval mode: ``W`` or ``a * T(W)`` with a random ``T``.
INFERENCE_MODES = ("plain", "shadow")
#: Initial values of the learnable scale ``a``: ``U(0, 1)`` (the authors') or 1.
SCALE_INITS = ("uniform", "one")

#: Range of the crop's area fraction ``s`` of ``"resize-crop"`` (arXiv 2405.19590).
CROP_AREA = (0.8, 1.0)
#: Largest shift of ``"translate"``, as a fraction of the kernel size along each axis.
MAX_SHIFT = 0.3
#: ``scale`` (area fraction) and ``ratio`` (width / height) ranges of the authors'
#: ``RandomResizedCrop((3, 3), scale=(0.8, 1.0))``; the ratio is torchvision's default.
REFERENCE_SCALE = (0.8, 1.0)
REFERENCE_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Crop sizes RandomResizedCrop tries before falling back to a centre crop.
REFERENCE_ATTEMPTS = 10

# The affine maps act on normalised coordinates where the kernel spans [-1, 1] along each
# axis (align_corners=False), i.e. 2 units; a fraction f of the kernel size is 2 f units.
_MAX_SHIFT_NORMALISED = 2.0 * MAX_SHIFT
# spawn_key of the SeedSequence streams derived from a layer's generator seed and from a
# run seed: distinct keys keep the scale initialisation and the evaluation draws independent
# of the transforms drawn in training.
_SCALE_STREAM = 1
_EVALUATION_STREAM = 2


class AffineParams(NamedTuple):
    """Parameters of the affine resampling of a kernel.

    Output location ``p`` (normalised coordinates, the kernel spanning ``[-1, 1]`` along
    each axis, ``align_corners=False``) is read from input location ``scale * p + offset``.

    Attributes
    ----------
    scale : float
        Side of the sampled window relative to the kernel; ``sqrt(s)`` for a crop of area
        fraction ``s``, ``1`` for a translation.
    offset_x, offset_y : float
        Centre of the sampled window along the width (``x``, last axis) and height (``y``).
        A translation moving the kernel's content by ``(dx, dy)`` has offsets ``(-dx, -dy)``;
        one pixel of a ``k``-wide kernel is ``2 / k`` units.
    """

    scale: float
    offset_x: float
    offset_y: float


class CropParams(NamedTuple):
    """An integer crop of a kernel, as ``torchvision.transforms.functional.crop`` takes it.

    Attributes
    ----------
    top, left : int
        Index of the crop's first row and first column.
    height, width : int
        Size of the crop, at least 1 and at most the kernel's.
    """

    top: int
    left: int
    height: int
    width: int


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def sample_affine(transform: str, generator: torch.Generator) -> AffineParams:
    """Draw the random parameters of one kernel transform.

    Parameters
    ----------
    transform : {"resize-crop", "translate"}
        An affine transform (``"reference"`` draws with :func:`sample_crop`).
        ``"resize-crop"``: area fraction ``s ~ U(0.8, 1.0)``, window side ``sqrt(s)`` and a
        centre uniform over the positions that keep the window inside the kernel.
        ``"translate"``: shifts uniform in ``[-0.3, 0.3]`` of the kernel size per axis
        (Zhuang et al., arXiv 2405.19590).
    generator : torch.Generator
        Source of randomness; exactly three uniforms are drawn for either transform, so the
        stream advances the same way whatever the transform.

    Returns
    -------
    AffineParams
        The sampling map of :func:`apply_affine`.

    Raises
    ------
    ValueError
        If ``transform`` is not an affine transform.
    """
    _check_choice("transform", transform, AFFINE_TRANSFORMS)
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    if transform == "resize-crop":
        low, high = CROP_AREA
        side = math.sqrt(low + (high - low) * u[0])
        # The window [c - side, c + side] stays inside [-1, 1] iff |c| <= 1 - side.
        room = 1.0 - side
        return AffineParams(side, room * (2.0 * u[1] - 1.0), room * (2.0 * u[2] - 1.0))
    dx = _MAX_SHIFT_NORMALISED * (2.0 * u[1] - 1.0)
    dy = _MAX_SHIFT_NORMALISED * (2.0 * u[2] - 1.0)
    return AffineParams(1.0, -dx, -dy)


def apply_affine(weight: Tensor, params: AffineParams, padding_mode: str) -> Tensor:
    """Resample every ``k_h x k_w`` kernel of ``weight`` through one affine map.

    Parameters
    ----------
    weight : Tensor
        Conv weight of shape ``[out, in, k_h, k_w]`` (float dtype).
    params : AffineParams
        The map, shared by all ``out x in`` kernels.
    padding_mode : {"zeros", "border", "reflection"}
        How :func:`torch.nn.functional.grid_sample` reads outside the kernel's pixel centres.

    Returns
    -------
    Tensor
        Same shape, dtype and device as ``weight``; differentiable in ``weight``.
    """
    out_ch, in_ch, kh, kw = weight.shape
    theta = torch.tensor(
        [[params.scale, 0.0, params.offset_x], [0.0, params.scale, params.offset_y]],
        dtype=weight.dtype,
        device=weight.device,
    ).unsqueeze(0)
    # All kernels share the map, so they go in as the channels of one "image" and a single
    # sampling grid serves them all.
    images = weight.reshape(1, out_ch * in_ch, kh, kw)
    grid = F.affine_grid(theta, [1, out_ch * in_ch, kh, kw], align_corners=False)
    resampled = F.grid_sample(
        images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )
    return resampled.reshape(out_ch, in_ch, kh, kw)


def sample_crop(
    kernel_size: tuple[int, int],
    generator: torch.Generator,
    scale: tuple[float, float] = REFERENCE_SCALE,
    ratio: tuple[float, float] = REFERENCE_RATIO,
) -> CropParams:
    """Draw a crop as ``torchvision.transforms.RandomResizedCrop.get_params`` does.

    The ``"reference"`` transform of WAS (Zhuang et al., arXiv 2405.19590; the authors' code
    crops the weight with ``RandomResizedCrop((3, 3), scale=(0.8, 1.0))``). Up to
    :data:`REFERENCE_ATTEMPTS` times: target area ``t = k_h k_w U(scale)``, aspect ratio
    ``r = exp(U(log ratio))``, width ``round(sqrt(t r))`` and height ``round(sqrt(t / r))``
    (Python's ``round``, as torchvision); the first size that fits in the kernel is placed
    at a uniformly random integer position. If none fits, the centre crop of the kernel
    with its aspect ratio clamped to ``ratio`` (:func:`centre_crop`; for a square kernel:
    the whole kernel).

    For a ``3 x 3`` kernel the width and height can only be 2 or 3 and never both 2 (the
    area is at least 7.2 > 2.5**2), so the first attempt always fits: the whole kernel with
    probability about 0.844, a ``2 x 3`` or ``3 x 2`` crop otherwise.

    Parameters
    ----------
    kernel_size : tuple of int
        ``(k_h, k_w)``, the "image" being cropped.
    generator : torch.Generator
        Source of randomness, used in place of torchvision's global RNG: two float64 uniforms
        per attempt, then two ``torch.randint`` for the position of an accepted crop.
    scale, ratio : tuple of float, optional
        As in ``RandomResizedCrop``; the defaults are the authors'.

    Returns
    -------
    CropParams
        Inside the kernel.
    """
    height, width = kernel_size
    area = height * width
    low, high = scale
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(REFERENCE_ATTEMPTS):
        u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (low + (high - low) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return CropParams(top, left, h, w)
    return centre_crop(kernel_size, ratio)


def centre_crop(kernel_size: tuple[int, int],
                ratio: tuple[float, float] = REFERENCE_RATIO) -> CropParams:
    """RandomResizedCrop's fallback: the centred crop with the aspect ratio clamped to ``ratio``.

    Parameters
    ----------
    kernel_size : tuple of int
        ``(k_h, k_w)``.
    ratio : tuple of float, optional
        Allowed range of width / height.

    Returns
    -------
    CropParams
        The whole kernel when its own aspect ratio is within ``ratio``; otherwise the
        longer side is cut to the nearest extreme ratio, centred (rounding down).
    """
    height, width = kernel_size
    own = width / height
    if own < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif own > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return CropParams((height - h) // 2, (width - w) // 2, h, w)


def resized_crop(weight: Tensor, params: CropParams) -> Tensor:
    """Crop every kernel of ``weight`` and resize it back to ``k_h x k_w`` (bilinear).

    Equals ``torchvision.transforms.functional.resized_crop(weight, *params, [k_h, k_w],
    antialias=True)``: the crop is never larger than the kernel, so the resize only ever
    upsamples, where antialiasing changes nothing, and plain
    :func:`torch.nn.functional.interpolate` (``align_corners=False``) does the same. Output
    pixel ``p`` of an axis of crop length ``n`` and kernel length ``k`` reads source
    coordinate ``(p + 0.5) n / k - 0.5``, clamped at the crop's edges.

    Parameters
    ----------
    weight : Tensor
        Conv weight ``[out, in, k_h, k_w]`` (float dtype); all kernels share the crop.
    params : CropParams
        Inside the kernel.

    Returns
    -------
    Tensor
        ``weight`` itself when the crop is the whole kernel; otherwise a tensor of the same
        shape, dtype and device, differentiable in ``weight``.

    Raises
    ------
    ValueError
        If the crop is empty or leaves the kernel.
    """
    kh, kw = weight.shape[-2:]
    top, left, h, w = params
    if not (0 < h and 0 < w and 0 <= top <= kh - h and 0 <= left <= kw - w):
        raise ValueError(f"crop {params} does not fit a {kh} x {kw} kernel")
    if (h, w) == (kh, kw):
        return weight
    crop = weight[..., top:top + h, left:left + w]
    # [out, in, h, w] is read by interpolate as a batch of `out` images with `in` channels.
    return F.interpolate(crop, size=(kh, kw), mode="bilinear", align_corners=False)


def sample_transform(transform: str, kernel_size: tuple[int, int],
                     generator: torch.Generator) -> AffineParams | CropParams:
    """Draw the random parameters of ``transform`` for a kernel of ``kernel_size``.

    Parameters
    ----------
    transform : {"reference", "resize-crop", "translate"}
        ``"reference"`` draws with :func:`sample_crop`, the others with :func:`sample_affine`.
    kernel_size : tuple of int
        ``(k_h, k_w)``.
    generator : torch.Generator
        Source of randomness.

    Returns
    -------
    AffineParams or CropParams
        What :func:`transform_kernel` takes for ``transform``.
    """
    _check_choice("transform", transform, TRANSFORMS)
    if transform == "reference":
        return sample_crop(kernel_size, generator)
    return sample_affine(transform, generator)


def _padding_for(transform: str) -> str:
    # A crop lies inside the kernel, but bilinear reads between the outer pixel centres and
    # the kernel's edge still need a neighbour: "border" repeats the edge pixel, as resizing
    # a cropped image does, instead of fading the crop's rim towards zero. A translation
    # moves content out of the kernel and zeros in, as specified by the method.
    return "border" if transform == "resize-crop" else "zeros"


def transform_kernel(weight: Tensor, transform: str,
                     params: AffineParams | CropParams) -> Tensor:
    """Deterministic part of ``T``: apply ``transform`` with chosen parameters.

    Parameters
    ----------
    weight : Tensor
        Conv weight ``[out, in, k_h, k_w]``.
    transform : {"reference", "resize-crop", "translate"}
        ``"reference"`` takes :class:`CropParams` (:func:`resized_crop`); the affine ones take
        :class:`AffineParams` and select the padding (``"border"`` for crops, ``"zeros"`` for
        translations).
    params : AffineParams or CropParams
        E.g. from :func:`sample_transform`.

    Returns
    -------
    Tensor
        ``T(W)``; ``weight`` itself for ``1 x 1`` kernels, which have nothing to crop or shift
        (arXiv 2405.19590 transforms spatial kernels), and for a ``"reference"`` crop that is
        the whole kernel.

    Raises
    ------
    ValueError
        If ``transform`` is unknown, ``params`` are of the other kind, or ``weight`` is not
        4-D.
    """
    _check_choice("transform", transform, TRANSFORMS)
    if weight.dim() != 4:
        raise ValueError(f"weight must be [out, in, k_h, k_w], got shape {tuple(weight.shape)}")
    expected = CropParams if transform == "reference" else AffineParams
    if not isinstance(params, expected):
        raise ValueError(f"transform {transform!r} takes {expected.__name__}, got {params!r}")
    if weight.shape[-2:] == (1, 1):
        return weight
    if isinstance(params, CropParams):
        return resized_crop(weight, params)
    return apply_affine(weight, params, _padding_for(transform))


def kernel_transform(weight: Tensor, transform: str, generator: torch.Generator) -> Tensor:
    """``T(W)`` of WAS (arXiv 2405.19590) with a freshly drawn random transform.

    Parameters
    ----------
    weight : Tensor
        Conv weight ``[out, in, k_h, k_w]``.
    transform : {"reference", "resize-crop", "translate"}
        The transform family, see :func:`sample_transform`.
    generator : torch.Generator
        Advanced by one draw of :func:`sample_transform`, except for ``1 x 1`` kernels whose
        transform is the identity and needs no randomness.

    Returns
    -------
    Tensor
        The transformed weight, differentiable in ``weight`` (``weight`` itself when the
        draw leaves it unchanged).
    """
    _check_choice("transform", transform, TRANSFORMS)
    if weight.dim() == 4 and weight.shape[-2:] == (1, 1):
        return weight
    params = sample_transform(transform, tuple(weight.shape[-2:]), generator)
    return transform_kernel(weight, transform, params)


def initial_scale(scale_init: str, generator_seed: int) -> float:
    """The initial value of a layer's shadow scale ``a``.

    Parameters
    ----------
    scale_init : {"uniform", "one"}
        ``"uniform"``: ``a ~ U(0, 1)``, as the authors' code (``torch.rand``; Zhuang et al.,
        arXiv 2405.19590). ``"one"``: ``a = 1``, so that ``SW = T(W)`` at the start.
    generator_seed : int
        The layer's generator seed. The uniform is drawn from its own stream,
        ``numpy.random.SeedSequence(generator_seed mod 2**64, spawn_key=(1,))``, which is
        independent of the layer's transforms (its :class:`torch.Generator` is not advanced)
        and of the global torch and numpy RNGs.

    Returns
    -------
    float
        ``a``, in ``[0, 1)`` for ``"uniform"``.

    Raises
    ------
    ValueError
        If ``scale_init`` is unknown.
    """
    _check_choice("scale_init", scale_init, SCALE_INITS)
    if scale_init == "one":
        return 1.0
    stream = np.random.SeedSequence(generator_seed % 2**64, spawn_key=(_SCALE_STREAM,))
    return float(np.random.default_rng(stream).random())


class ShadowConv2d(nn.Conv2d):
    """A Conv2d that trains through shadow weights; its state adds ``shadow_scale`` (the learnable a).

    In training mode the convolution uses ``SW = a * T(W)`` with a random kernel transform
    ``T`` redrawn at every forward pass (Zhuang et al., "Weight Augmentation Strategy",
    arXiv 2405.19590). In eval mode it uses ``W`` (``inference="plain"``, accuracy-oriented)
    or, desire-oriented (``inference="shadow"``), ``a * T(W)`` with a fresh random ``T`` per
    forward pass as in training: eval-mode outputs then depend on :attr:`generator` (reseed
    to repeat them) and on how the inputs are batched (one draw per forward pass).

    What the scale does. The conv is linear in its weight, so ``a`` multiplies the conv's
    output ``z`` (the bias ``b`` excluded): ``conv(x; a T(W)) = a z + b``, and
    ``dL/da = sum(dL/dy * z)``. Where no normalisation follows, ``a`` is a learnable gain of
    the layer (relative to ``b``, if any) and learns like any weight. Where a BatchNorm in
    train mode follows (every conv of this project's models), the batch statistics absorb
    it: the batch mean is ``a mu + b`` and the variance ``a**2 var``, so
    ``BN(a z + b) = a (z - mu) / sqrt(a**2 var + eps) = BN(z)`` for ``a > 0`` up to
    ``eps``, with or without a conv bias (BN removes ``b`` as well). The loss then depends
    on ``a`` only through ``eps / (a**2 var)``: ``dL/da`` is close to zero (of the order
    of 1e-5 of ``||dL/dW||`` in this project's tests) and, without weight decay, ``a`` stays (nearly) where
    it was initialised; weight decay shrinks it like any weight. It still sets the scale at
    which the BN's *running* statistics are gathered (``a z + b``): eval-mode BN with the
    ``"shadow"`` inference is consistent with them, whereas ``"plain"`` feeds ``z + b``
    into that BN, off by the factor ``1 / a``, unless the statistics are recomputed with
    the plain weights.

    Parameters
    ----------
    *args, **kwargs
        Those of :class:`torch.nn.Conv2d`.
    transform : {"reference", "resize-crop", "translate"}, optional
        The random transform ``T``; ``"reference"`` (default) is the authors' random resized
        crop.
    inference : {"plain", "shadow"}, optional
        Weight used in eval mode.
    scale_init : {"uniform", "one"}, optional
        Initial ``a``: 1 (default) or ``U(0, 1)`` (the authors') drawn from a stream derived
        from ``generator_seed`` (:func:`initial_scale`); see the module docstring for why 1
        is the default.
    generator_seed : int, optional
        Seed of the layer's own CPU generator (see :meth:`reseed`).

    Attributes
    ----------
    shadow_scale : torch.nn.Parameter
        The scalar ``a`` (0-d).
    transform, inference : str
        As above.
    generator : torch.Generator
        Source of the transforms, kept out of the global RNG so that augmenting weights does
        not shift data shuffling; not part of the ``state_dict`` (reseed per round instead).
    """

    def __init__(
        self,
        *args: object,
        transform: str = "reference",
        inference: str = "plain",
        scale_init: str = "one",
        generator_seed: int = 0,
        **kwargs: object,
    ) -> None:
        _check_choice("transform", transform, TRANSFORMS)
        _check_choice("inference", inference, INFERENCE_MODES)
        scale = initial_scale(scale_init, generator_seed)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.transform = transform
        self.inference = inference
        self.shadow_scale = nn.Parameter(
            torch.full((), scale, dtype=self.weight.dtype, device=self.weight.device)
        )
        self.generator = torch.Generator()
        self.reseed(generator_seed)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        transform: str = "reference",
        inference: str = "plain",
        generator_seed: int = 0,
        scale_init: str = "one",
    ) -> ShadowConv2d:
        """Build a shadow conv with the configuration and a copy of the weights of ``conv``.

        Parameters
        ----------
        conv : torch.nn.Conv2d
            Source layer; left unchanged and sharing no storage with the result.
        transform, inference, generator_seed, scale_init
            As in the class.

        Returns
        -------
        ShadowConv2d
            Same device, dtype, training mode and ``requires_grad`` as ``conv``;
            ``shadow_scale`` from ``scale_init`` and ``generator_seed``.
        """
        weight = conv.weight
        # Built on the meta device: a normal build would run the default initialisation,
        # consuming the global (or CUDA) RNG only to overwrite the result, and so shift the
        # caller's random stream depending on whether shadow weights are used.
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
            dtype=weight.dtype,
            transform=transform,
            inference=inference,
            scale_init=scale_init,
            generator_seed=generator_seed,
        )
        new.to_empty(device=weight.device)
        with torch.no_grad():
            new.weight.copy_(weight)
            new.weight.requires_grad_(weight.requires_grad)
            if conv.bias is not None:
                assert new.bias is not None
                new.bias.copy_(conv.bias)
                new.bias.requires_grad_(conv.bias.requires_grad)
            # to_empty left the meta tensor's storage uninitialised.
            new.shadow_scale.fill_(initial_scale(scale_init, generator_seed))
        new.train(conv.training)
        return new

    def reseed(self, seed: int) -> None:
        """Reset the layer's generator to ``seed``; the next transforms are then reproducible.

        Parameters
        ----------
        seed : int
            Any integer accepted by :meth:`torch.Generator.manual_seed`.
        """
        self.generator.manual_seed(seed)

    def shadow_weight(self) -> Tensor:
        """``a * T(W)`` with a fresh random ``T`` (advances :attr:`generator`).

        Returns
        -------
        Tensor
            The shadow weight, differentiable in ``weight`` and ``shadow_scale``.
        """
        return self.shadow_scale * kernel_transform(self.weight, self.transform, self.generator)

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x`` with the shadow weight (training) or the inference weight (eval).

        Draws one transform from :attr:`generator` in training and in eval mode with
        ``inference="shadow"``; none with ``"plain"``.

        Parameters
        ----------
        x : Tensor
            Input ``[N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``).

        Returns
        -------
        Tensor
            The convolution's output.

        Raises
        ------
        ValueError
            If :attr:`inference` was set to an unknown mode.
        """
        if self.training:
            weight = self.shadow_weight()
        elif self.inference == "plain":
            weight = self.weight
        elif self.inference == "shadow":
            # Desire-oriented mode ("deploy 1" of the authors' code): a fresh random T at
            # test time too, exactly as in training.
            weight = self.shadow_weight()
        else:
            _check_choice("inference", self.inference, INFERENCE_MODES)
            raise AssertionError("unreachable")
        # _conv_forward is nn.Conv2d's own path (it handles non-zero padding modes), so the
        # plain eval mode is bitwise the ordinary convolution.
        return self._conv_forward(x, weight, self.bias)

    def extra_repr(self) -> str:
        """Conv2d's description plus the transform and the inference mode."""
        return f"{super().extra_repr()}, transform={self.transform}, inference={self.inference}"


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Conv2d`` (shadow or not) of ``model``, in registration order.

    Parameters
    ----------
    model : torch.nn.Module
        Any model.

    Returns
    -------
    list of str
        Module names as in ``model.named_modules()``, e.g. ``"layer2.0.shortcut.0"``; the
        position in this list is the layer index that seeds its generator.
    """
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def _layer_seed(seed: int, index: int) -> int:
    # SeedSequence mixes (seed, index) into well-separated 64-bit seeds; a linear formula
    # such as seed * K + index would give colliding or correlated streams across rounds.
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def add_shadow_weights(
    model: nn.Module,
    layers: str | Sequence[str] = "all",
    transform: str = "reference",
    inference: str = "plain",
    seed: int = 0,
    scale_init: str = "one",
) -> nn.Module:
    """Replace selected convolutions of ``model`` by :class:`ShadowConv2d`, in place.

    Implements the shadow weights of WAS (Zhuang et al., arXiv 2405.19590): each selected
    layer gains a learnable scale ``shadow_scale`` (state-dict key ``"<layer>.shadow_scale"``)
    and trains through randomly transformed kernels.

    Parameters
    ----------
    model : torch.nn.Module
        Model to modify.
    layers : str or sequence of str, optional
        ``"all"`` (default) for every ``nn.Conv2d``, or one name / a list of names from
        :func:`conv_layer_names`.
    transform : {"reference", "resize-crop", "translate"}, optional
        The random kernel transform; ``"reference"`` (default) is the authors' random
        resized crop.
    inference : {"plain", "shadow"}, optional
        Weight used in eval mode: ``W`` (accuracy-oriented) or ``a * T(W)`` with a fresh
        random ``T`` per forward pass (desire-oriented).
    seed : int, optional
        Non-negative; layer ``i`` of :func:`conv_layer_names` gets a generator seeded from
        ``(seed, i)``, so a layer's transforms do not depend on which other layers are
        selected.
    scale_init : {"uniform", "one"}, optional
        Initial ``a`` of every selected layer: 1 (default, see the module docstring) or
        ``U(0, 1)`` (the authors'), one independent draw per layer from a stream derived from ``(seed, i)``
        (:func:`initial_scale`; neither the global RNGs nor the layers' generators move),
        or 1. The same ``seed`` gives the same ``a`` everywhere, and in a federated run all
        clients start from the server's initial model anyway.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        If a name is not a conv layer of ``model`` (the message lists the allowed names),
        a selected layer already has shadow weights, ``transform``, ``inference`` or
        ``scale_init`` is unknown, or ``seed`` is negative.
    """
    _check_choice("transform", transform, TRANSFORMS)
    _check_choice("inference", inference, INFERENCE_MODES)
    _check_choice("scale_init", scale_init, SCALE_INITS)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    names = conv_layer_names(model)
    if isinstance(layers, str):
        selected = list(names) if layers == "all" else [layers]
    else:
        selected = list(layers)
    unknown = [name for name in selected if name not in names]
    if unknown:
        raise ValueError(
            f"unknown conv layer(s) {unknown}; allowed: 'all' or any of {names}"
        )
    for name in selected:
        conv = model.get_submodule(name)
        if isinstance(conv, ShadowConv2d):
            # Wrapping twice would drop the learnt shadow_scale; refuse rather than guess.
            raise ValueError(f"layer {name!r} already has shadow weights")
        assert isinstance(conv, nn.Conv2d)
        shadow = ShadowConv2d.from_conv(
            conv, transform, inference, _layer_seed(seed, names.index(name)), scale_init
        )
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, shadow)
    return model


def has_shadow_weights(model: nn.Module) -> bool:
    """Whether ``model`` holds any :class:`ShadowConv2d` (its forward draws random transforms)."""
    return any(isinstance(module, ShadowConv2d) for module in model.modules())


def reseed_shadow(model: nn.Module, seed: int) -> None:
    """Reseed every :class:`ShadowConv2d` of ``model`` as :func:`add_shadow_weights` would.

    Lets a client draw reproducible, round-specific transforms (e.g. ``seed`` derived from the
    run seed, the round and the client id), and makes a desire-oriented evaluation
    (``inference="shadow"``) repeatable (e.g. ``seed`` from :func:`evaluation_seed`).

    Parameters
    ----------
    model : torch.nn.Module
        Any model; layers that are not shadow convs are left alone.
    seed : int
        Non-negative; layer ``i`` of :func:`conv_layer_names` is seeded from ``(seed, i)``.

    Raises
    ------
    ValueError
        If ``seed`` is negative.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    for index, name in enumerate(conv_layer_names(model)):
        module = model.get_submodule(name)
        if isinstance(module, ShadowConv2d):
            module.reseed(_layer_seed(seed, index))


def evaluation_seed(run_seed: int, server_round: int) -> int:
    """Seed for :func:`reseed_shadow` before evaluating the model of ``server_round``.

    A desire-oriented evaluation (``inference="shadow"``) draws random transforms; reseeding
    from the run seed and the round before each evaluation makes its numbers the same for the
    same config and seed, whatever was drawn before (e.g. after a resume).

    Parameters
    ----------
    run_seed : int
        The run's seed, non-negative.
    server_round : int
        The evaluated round (0 for the initial model), non-negative.

    Returns
    -------
    int
        A 63-bit seed from ``numpy.random.SeedSequence([run_seed, server_round])`` with its own
        ``spawn_key``: unrelated to the clients' training seeds of the same round.

    Raises
    ------
    ValueError
        If an argument is negative.
    """
    if run_seed < 0 or server_round < 0:
        raise ValueError(f"run_seed and server_round must be >= 0, got {run_seed}, {server_round}")
    stream = np.random.SeedSequence([run_seed, server_round], spawn_key=(_EVALUATION_STREAM,))
    return int(stream.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
