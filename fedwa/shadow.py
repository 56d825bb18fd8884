"""Shadow weights of the Weight Augmentation Strategy (WAS).

WAS (Zhuang et al., "Weight Augmentation Strategy", arXiv 2405.19590) augments the *weights*
of a network rather than its inputs. Every selected convolution keeps its plain weight ``W``
and gains one learnable scalar ``a`` (initialised to 1). During training its forward pass uses
the *shadow weight*

    SW = a * T(W),

where ``T`` is a random transform of the kernels, redrawn at every forward pass. Gradients
flow through ``T`` into ``W`` and into ``a``, so the plain weight learns to work under a whole
family of perturbed kernels. Two inference modes are offered, following the paper's
accuracy-oriented and desire-oriented modes:

* ``"plain"`` (accuracy-oriented, default): the evaluated conv uses ``W`` exactly.
* ``"shadow"`` (desire-oriented): the evaluated conv uses ``a * W``. We read the paper's
  shadow weight at inference as ``a * E[T(W)]`` and take the transform's expectation as the
  identity: drawing a random kernel at evaluation time would make predictions
  non-deterministic, which no evaluation protocol in this project can accept.

Two transforms ``T`` are implemented, both as an affine resampling of each ``k_h x k_w``
kernel seen as a tiny image (``torch.nn.functional.affine_grid`` + ``grid_sample`` with
``align_corners=False``, so ``T(W)`` is differentiable in ``W``):

* ``"resize-crop"``: a square crop (aspect ratio 1) covering a fraction ``s ~ U(0.8, 1.0)`` of
  the kernel's area, at a uniformly random position inside the kernel, resized back to
  ``k_h x k_w`` with bilinear interpolation.
* ``"translate"``: a shift of up to 30% of the kernel size along each axis (independent
  uniform draws), bilinear, with zeros shifted in.

One random transform is drawn per forward pass and shared by every kernel of the layer (all
``out x in`` channel pairs). The paper augments a layer's weight as one object; sharing the
draw also keeps the cost at one small ``grid_sample`` per layer and makes the transform of a
layer a single reproducible event of its generator. ``1 x 1`` kernels have nothing to crop
or shift, so for them ``T`` is the identity and ``SW = a * W``.

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
TRANSFORMS = ("resize-crop", "translate")
#: What a :class:`ShadowConv2d` uses in eval mode: ``W`` or ``a * W``.
INFERENCE_MODES = ("plain", "shadow")

#: Range of the crop's area fraction ``s`` of ``"resize-crop"`` (arXiv 2405.19590).
CROP_AREA = (0.8, 1.0)
#: Largest shift of ``"translate"``, as a fraction of the kernel size along each axis.
MAX_SHIFT = 0.3

# The affine maps act on normalised coordinates where the kernel spans [-1, 1] along each
# axis (align_corners=False), i.e. 2 units; a fraction f of the kernel size is 2 f units.
_MAX_SHIFT_NORMALISED = 2.0 * MAX_SHIFT


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


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def sample_affine(transform: str, generator: torch.Generator) -> AffineParams:
    """Draw the random parameters of one kernel transform.

    Parameters
    ----------
    transform : {"resize-crop", "translate"}
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
        If ``transform`` is unknown.
    """
    _check_choice("transform", transform, TRANSFORMS)
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


def _padding_for(transform: str) -> str:
    # A crop lies inside the kernel, but bilinear reads between the outer pixel centres and
    # the kernel's edge still need a neighbour: "border" repeats the edge pixel, as resizing
    # a cropped image does, instead of fading the crop's rim towards zero. A translation
    # moves content out of the kernel and zeros in, as specified by the method.
    return "border" if transform == "resize-crop" else "zeros"


def transform_kernel(weight: Tensor, transform: str, params: AffineParams) -> Tensor:
    """Deterministic part of ``T``: apply ``transform`` with chosen parameters.

    Parameters
    ----------
    weight : Tensor
        Conv weight ``[out, in, k_h, k_w]``.
    transform : {"resize-crop", "translate"}
        Selects the padding (``"border"`` for crops, ``"zeros"`` for translations).
    params : AffineParams
        E.g. from :func:`sample_affine`.

    Returns
    -------
    Tensor
        ``T(W)``; ``weight`` itself for ``1 x 1`` kernels, which have nothing to crop or shift
        (arXiv 2405.19590 transforms spatial kernels).

    Raises
    ------
    ValueError
        If ``transform`` is unknown or ``weight`` is not 4-D.
    """
    _check_choice("transform", transform, TRANSFORMS)
    if weight.dim() != 4:
        raise ValueError(f"weight must be [out, in, k_h, k_w], got shape {tuple(weight.shape)}")
    if weight.shape[-2:] == (1, 1):
        return weight
    return apply_affine(weight, params, _padding_for(transform))


def kernel_transform(weight: Tensor, transform: str, generator: torch.Generator) -> Tensor:
    """``T(W)`` of WAS (arXiv 2405.19590) with a freshly drawn random transform.

    Parameters
    ----------
    weight : Tensor
        Conv weight ``[out, in, k_h, k_w]``.
    transform : {"resize-crop", "translate"}
        The transform family, see :func:`sample_affine`.
    generator : torch.Generator
        Advanced by one draw, except for ``1 x 1`` kernels whose transform is the identity
        and needs no randomness.

    Returns
    -------
    Tensor
        The transformed weight, differentiable in ``weight``.
    """
    _check_choice("transform", transform, TRANSFORMS)
    if weight.dim() == 4 and weight.shape[-2:] == (1, 1):
        return weight
    return transform_kernel(weight, transform, sample_affine(transform, generator))


class ShadowConv2d(nn.Conv2d):
    """A Conv2d that trains through shadow weights; its state adds ``shadow_scale`` (the learnable a).

    In training mode the convolution uses ``SW = a * T(W)`` with a random kernel transform
    ``T`` redrawn at every forward pass (Zhuang et al., "Weight Augmentation Strategy",
    arXiv 2405.19590); in eval mode it uses ``W`` (``inference="plain"``) or ``a * W``
    (``inference="shadow"``).

    Parameters
    ----------
    *args, **kwargs
        Those of :class:`torch.nn.Conv2d`.
    transform : {"resize-crop", "translate"}, optional
        The random transform ``T``.
    inference : {"plain", "shadow"}, optional
        Weight used in eval mode.
    generator_seed : int, optional
        Seed of the layer's own CPU generator (see :meth:`reseed`).

    Attributes
    ----------
    shadow_scale : torch.nn.Parameter
        The scalar ``a`` (0-d), initialised to 1.
    transform, inference : str
        As above.
    generator : torch.Generator
        Source of the transforms, kept out of the global RNG so that augmenting weights does
        not shift data shuffling; not part of the ``state_dict`` (reseed per round instead).
    """

    def __init__(
        self,
        *args: object,
        transform: str = "resize-crop",
        inference: str = "plain",
        generator_seed: int = 0,
        **kwargs: object,
    ) -> None:
        _check_choice("transform", transform, TRANSFORMS)
        _check_choice("inference", inference, INFERENCE_MODES)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.transform = transform
        self.inference = inference
        self.shadow_scale = nn.Parameter(
            torch.ones((), dtype=self.weight.dtype, device=self.weight.device)
        )
        self.generator = torch.Generator()
        self.reseed(generator_seed)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        transform: str = "resize-crop",
        inference: str = "plain",
        generator_seed: int = 0,
    ) -> ShadowConv2d:
        """Build a shadow conv with the configuration and a copy of the weights of ``conv``.

        Parameters
        ----------
        conv : torch.nn.Conv2d
            Source layer; left unchanged and sharing no storage with the result.
        transform, inference, generator_seed
            As in the class.

        Returns
        -------
        ShadowConv2d
            Same device, dtype, training mode and ``requires_grad`` as ``conv``;
            ``shadow_scale`` is 1.
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
            new.shadow_scale.fill_(1.0)
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
            weight = self.shadow_scale * self.weight
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
    transform: str = "resize-crop",
    inference: str = "plain",
    seed: int = 0,
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
    transform : {"resize-crop", "translate"}, optional
        The random kernel transform.
    inference : {"plain", "shadow"}, optional
        Weight used in eval mode: ``W`` (accuracy-oriented) or ``a * W`` (desire-oriented).
    seed : int, optional
        Non-negative; layer ``i`` of :func:`conv_layer_names` gets a generator seeded from
        ``(seed, i)``, so a layer's transforms do not depend on which other layers are
        selected.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        If a name is not a conv layer of ``model`` (the message lists the allowed names),
        a selected layer already has shadow weights, ``transform`` or ``inference`` is unknown,
        or ``seed`` is negative.
    """
    _check_choice("transform", transform, TRANSFORMS)
    _check_choice("inference", inference, INFERENCE_MODES)
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
            conv, transform, inference, _layer_seed(seed, names.index(name))
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
    run seed, the round and the client id).

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
