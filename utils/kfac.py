"""The Kronecker-factored Fisher of the weights unlearning updates: K-FAC and its eigenvalue-corrected form EK-FAC
(`sd_ekfac.safetensors`), estimating it over the LAION samples the diagonal Fisher uses and loading it for the
unlearning step (docs/method.md, section 5).

For y = x W^T (the cross-attention K/V read the caption's T token states x_t), sample n's gradient is
DW_n = sum_t g_t x_t^T with g = dL_n/dy. K-FAC (Martens & Grosse 2015; the token sum as Eschenhagen et al. 2023's
K-FAC-expand) approximates the Fisher E_n[vec DW_n vec DW_n^T] by A (x) G, with

    A = E_n[sum_t x_t x_t^T] / T  [in, in],   G = E_n[sum_t g_t g_t^T]  [out, out].

K-FAC-reduce (`approx="reduce"`, their variant for layers whose token outputs the loss mixes, as attention mixes the
K/V's) factors each sample's token mean input and token-summed output gradient instead:

    A = E_n[xbar xbar^T],  xbar = sum_t x_t / T;     G = E_n[gsum gsum^T],  gsum = sum_t g_t.

With A = Q_A diag(a) Q_A^T and G = Q_G diag(c) Q_G^T, its eigenvectors are the matrices Q_G[:, i] Q_A[:, j]^T and
its eigenvalues c_i a_j. EK-FAC (George et al. 2018, the preconditioner of Grosse et al. 2023's influence functions)
keeps that basis and refits each eigenvalue to the gradients' second moment in it:

    Lambda_ij = E_n[(Q_G^T DW_n Q_A)_ij^2].

With Q_A and Q_G the identity, Lambda is the diagonal Fisher (utils.fisher), and AbU's step
p += lr * F^-1 grad / N / accum becomes the same step taken in the rotated basis (KroneckerEigenFisher.solve).
Because a rotation keeps the squared norm, sum(Lambda) equals the diagonal Fisher's sum over the same samples.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .data import LaionCandidates
from .errors import InputError
from .fisher import accumulate_over_samples, check_fisher_entries, load_fisher_table
from .models import BaseModel
from .per_sample_grads import PerSampleLinearGrads

EKFAC_FILE = "sd_ekfac.safetensors"
EKFAC_REDUCE_FILE = "sd_ekfac_reduce.safetensors"  # the same with K-FAC-reduce's factors (--kfac_approx reduce)
KFAC_APPROXIMATIONS = ("expand", "reduce")
KRONECKER_PRECONDITIONERS = ("ekfac", "kfac")
PARTS = ("eigvecs_in", "eigvecs_out", "eigvals_in", "eigvals_out", "eigvals")  # <param>.<part> in the file


class KroneckerFactorHooks(PerSampleLinearGrads):
    """Hooks on the nn.Linear modules owning the weights `names`; after backward, `factors[name]` is the batch's
    (A, G) sums, float64: K-FAC-expand's (sum_n sum_t x x^T / T [in, in], sum_n sum_t g g^T [out, out]), or with
    `approx="reduce"` K-FAC-reduce's (sum_n xbar xbar^T, sum_n gsum gsum^T) of the module doc."""

    def __init__(self, model: torch.nn.Module, names: List[str], approx: str = "expand"):
        super().__init__(model, names)
        self.factors: Dict[str, tuple] = {}
        self.approx = approx

    def _store(self, module_name, x, g):
        name = f"{module_name}.weight"
        b = x.shape[0]
        x, g = x.reshape(b, -1, x.shape[-1]).double(), g.reshape(b, -1, g.shape[-1]).double()
        if self.approx == "reduce":  # one vector per sample: the tokens' mean input, their summed output gradient
            x_mean, g_sum = x.mean(1), g.sum(1)
            a, c = x_mean.T @ x_mean, g_sum.T @ g_sum
        else:
            a, c = torch.einsum("bti,btj->ij", x, x) / x.shape[1], torch.einsum("bto,btp->op", g, g)
        if name in self.factors:  # a module called twice in one forward adds up
            a, c = a + self.factors[name][0], c + self.factors[name][1]
        self.factors[name] = (a, c)


def check_linear_weights(model: torch.nn.Module, names: List[str]) -> None:
    """Kronecker factors exist for nn.Linear weights only: raises InputError naming the first other parameter."""
    linear = {f"{mn}.weight" for mn, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    other = [n for n in names if n not in linear]
    if other:
        raise InputError(f"--weight_selection picks {len(other)} parameter(s) that are not nn.Linear weights "
                         f"(e.g. {other[0]!r}), which K-FAC / EK-FAC do not factor; use --weight_selection "
                         f"cross-attn-kv, or the diagonal Fisher (--preconditioner fisher)")


def estimate_ekfac(base: BaseModel, laion: LaionCandidates, names: List[str], num_samples: int, batch_size: int,
                   seed: int, device, state=None, on_checkpoint: Optional[Callable] = None,
                   save_every: int = 10_000, approx: str = "expand") -> Dict[str, torch.Tensor]:
    """K-FAC's factors, then EK-FAC's eigenvalues, over the same samples as utils.fisher.estimate_fisher.

    Two passes over the samples: the factors A, G (K-FAC-expand's, or with `approx="reduce"` K-FAC-reduce's; their
    eigenbases), then Lambda in those bases. Returns
    {"<name>.<part>": float64 CPU tensor} for the PARTS: eigvecs_in Q_A [in, in], eigvecs_out Q_G [out, out], their
    eigenvalues a [in] and c [out], and eigvals Lambda [out, in]. `state` ({"pass", "done", "sums"}, plus the bases
    in pass 2) resumes a checkpoint that `on_checkpoint` wrote; InputError for a name that is not a Linear weight.
    """
    check_linear_weights(base.unet, names)
    params = dict(base.unet.named_parameters())
    loop = dict(names=names, num_samples=num_samples, batch_size=batch_size, seed=seed, device=device,
                save_every=save_every)
    bases = state.get("bases") if state is not None and state["pass"] == 2 else None
    if bases is None:
        def add_factors(sums, tracker, _):
            for n in names:
                sums[f"{n}:A"] += tracker.factors[n][0]
                sums[f"{n}:G"] += tracker.factors[n][1]

        zeros = {}
        for n in names:
            out_dim, in_dim = params[n].shape
            zeros[f"{n}:A"] = torch.zeros(in_dim, in_dim, dtype=torch.float64, device=device)
            zeros[f"{n}:G"] = torch.zeros(out_dim, out_dim, dtype=torch.float64, device=device)
        sums = accumulate_over_samples(
            base, laion, add=add_factors, sums=zeros, hooks=lambda unet: KroneckerFactorHooks(unet, names, approx),
            state=state, desc="K-FAC factors",
            on_checkpoint=None if on_checkpoint is None else lambda st: on_checkpoint({**st, "pass": 1}), **loop)
        bases = {}
        for n in names:  # eigh of the mean factors: ascending eigenvalues, orthonormal columns
            bases[f"{n}.eigvals_in"], bases[f"{n}.eigvecs_in"] = torch.linalg.eigh(sums[f"{n}:A"] / num_samples)
            bases[f"{n}.eigvals_out"], bases[f"{n}.eigvecs_out"] = torch.linalg.eigh(sums[f"{n}:G"] / num_samples)
        bases = {k: v.cpu() for k, v in bases.items()}
        state = None
    on_device = {k: v.to(device) for k, v in bases.items()}

    def add_eigvals(sums, tracker, _):
        for n in names:
            rotated = on_device[f"{n}.eigvecs_out"].T @ tracker.grads[n] @ on_device[f"{n}.eigvecs_in"]
            sums[n] += rotated.pow(2).sum(0)

    zeros = {n: torch.zeros_like(params[n], dtype=torch.float64, device=device) for n in names}
    sums = accumulate_over_samples(
        base, laion, add=add_eigvals, sums=zeros, hooks=lambda unet: PerSampleLinearGrads(unet, names), state=state,
        desc="EK-FAC eigenvalues",
        on_checkpoint=None if on_checkpoint is None else lambda st: on_checkpoint({**st, "pass": 2, "bases": bases}),
        **loop)
    return {**bases, **{f"{n}.eigvals": (sums[n] / num_samples).cpu() for n in names}}


@dataclass
class KroneckerEigenFisher:
    """One weight's Fisher in a Kronecker eigenbasis: eigvecs_in Q_A [in, in], eigvecs_out Q_G [out, out] and its
    eigenvalues [out, in] (EK-FAC's Lambda, or K-FAC's c_i a_j), float64."""

    eigvecs_in: torch.Tensor
    eigvecs_out: torch.Tensor
    eigvals: torch.Tensor

    def solve(self, grad: torch.Tensor) -> torch.Tensor:
        """F^-1 grad for gradients of the weight's shape, [..., out, in] (float64): Q_G ((Q_G^T grad Q_A) / eigvals)
        Q_A^T."""
        q_in, q_out = self.eigvecs_in, self.eigvecs_out
        return q_out @ ((q_out.T @ grad.double() @ q_in) / self.eigvals) @ q_in.T


KFAC_MIN_SCALE = 1e-6  # K-FAC's eigenvalues may sum to this fraction of EK-FAC's, at least (check_kfac_scale)


def check_kfac_scale(kfac_eigvals: torch.Tensor, ekfac_eigvals: torch.Tensor, path, name: str) -> None:
    """Refuse K-FAC eigenvalues c_i a_j that sum to under KFAC_MIN_SCALE of EK-FAC's Lambda (the gradients' own second
    moment, the same total as the diagonal Fisher's): a factor that is zero up to rounding, whose inverse would blow
    the step up by as much. K-FAC-reduce's G of an attention key is one: softmax ignores a shift of all of a query's
    logits, so the key gradients of a sample sum to zero over its tokens."""
    moment = float(ekfac_eigvals.sum())
    if not moment > 0:
        raise InputError(f"{path}: the gradients' second moment of {name} (EK-FAC's eigenvalues) sums to {moment}: "
                         "no sample moved it; rebuild the file with compute_fisher.py --kind ekfac (more --num_samples)")
    ratio = float(kfac_eigvals.sum()) / moment
    if not ratio >= KFAC_MIN_SCALE:
        raise InputError(f"{path}: K-FAC's eigenvalues of {name} sum to {ratio:.1e} of the gradients' second moment "
                         "(EK-FAC's), so one of its factors is zero up to rounding (with K-FAC-reduce's factors, "
                         "every attention key's G is) and the step would divide by it; use --preconditioner ekfac "
                         "with this file, or K-FAC-expand's (compute_fisher.py --kind ekfac, the default "
                         f"--kfac_approx expand: --fisher_path <dataroot>/{EKFAC_FILE})")


def load_kronecker_fisher(path, params: Dict[str, torch.Tensor], preconditioner: str = "ekfac",
                          floor: Optional[float] = None, device="cpu") -> Dict[str, KroneckerEigenFisher]:
    """The EK-FAC file's entry of each parameter in `params` (weights [out, in]) on `device`: with `preconditioner`
    "ekfac" its refitted eigenvalues, with "kfac" K-FAC's products c_i a_j of the same factors.

    Names may carry a 'unet.' prefix. A parameter that is not a matrix, a file without the parts (a diagonal Fisher,
    say), another shape or a non-finite eigenvalue is an InputError; so is a zero or negative eigenvalue (the update
    divides by it; with "kfac", of either factor) unless `floor` raises every eigenvalue to at least that value; and
    with "kfac", factors whose products sum to under KFAC_MIN_SCALE of Lambda's (`check_kfac_scale`), floor or not.
    """
    remedy = "build it with compute_fisher.py --kind ekfac (--fisher_path)"
    table = load_fisher_table(path, "EK-FAC file", remedy)
    not_linear = [n for n, p in params.items() if p.dim() != 2]
    if not_linear:
        raise InputError(f"--preconditioner {preconditioner} factors nn.Linear weights only, and --weight_selection "
                         f"picks {len(not_linear)} other parameter(s) (e.g. {not_linear[0]!r}); use "
                         f"--weight_selection cross-attn-kv, or --preconditioner fisher")
    out = {}
    for name, p in params.items():
        missing = [part for part in PARTS if f"{name}.{part}" not in table]
        if missing and name in table:
            raise InputError(f"{path} holds a diagonal Fisher, not K-FAC's factors; pass --preconditioner fisher, or "
                             f"{remedy}")
        if missing:
            raise InputError(f"{path} has no {missing[0]} for {name!r}; {remedy} using the same --weight_selection")
        part = {k: table[f"{name}.{k}"].to(device=device, dtype=torch.float64) for k in PARTS}
        out_dim, in_dim = p.shape
        expected = {"eigvecs_in": (in_dim, in_dim), "eigvecs_out": (out_dim, out_dim), "eigvals_in": (in_dim,),
                    "eigvals_out": (out_dim,), "eigvals": (out_dim, in_dim)}
        for k, shape in expected.items():
            if tuple(part[k].shape) != shape:
                raise InputError(f"{path}: {k} of {name} has shape {tuple(part[k].shape)}, expected {shape}; "
                                 f"{remedy}")
        if preconditioner == "ekfac":
            eigvals = part["eigvals"]
        else:  # each factor must be positive, not only their products (two negatives multiply to a positive)
            eigvals = torch.outer(part["eigvals_out"], part["eigvals_in"])
            check_kfac_scale(eigvals, part["eigvals"], path, name)
            if floor is None:
                for k in ("eigvals_out", "eigvals_in"):
                    check_fisher_entries(part[k], path, f"K-FAC factor {k} of {name}")
        eigvals = check_fisher_entries(eigvals, path, f"{preconditioner} eigenvalues of {name}", floor)
        out[name] = KroneckerEigenFisher(part["eigvecs_in"], part["eigvecs_out"], eigvals)
    return out
