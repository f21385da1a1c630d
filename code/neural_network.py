"""Autograd MLPs, losses, regularisers and hypernetworks, batched over K weight sets (SPEC section 2).

Parameters are lists of (W, b) pairs. A *flat* elementary weight vector has W row-major, then b, layer
after layer. Batched code carries a leading axis K (one entry per hyperparameter sample or per network):
batched weights are [(W (K, in, out), b (K, out)), ...] and a batched prediction is (K, N, out).
"""
import autograd.numpy as np
import autograd.scipy.special as sps

LOG_SIGMA_CONST = np.log(0.1) + 0.5 * np.log(2 * np.pi)  # -log N(t|y,0.1) = 50 (y-t)^2 + this (-1.38364)


# --------------------------------------------------------------------------------- parameter lists

def init_mlp(layer_sizes, init_scale, rs):
    """[(W (m, n), b (n,)), ...] drawn from init_scale * N(0, 1) with RandomState rs (W before b per layer)."""
    return [(init_scale * rs.randn(m, n), init_scale * rs.randn(n))
            for m, n in zip(layer_sizes[:-1], layer_sizes[1:], strict=False)]


def num_params(layer_sizes):
    """Number of scalars in an MLP with these layer sizes."""
    return sum(m * n + n for m, n in zip(layer_sizes[:-1], layer_sizes[1:], strict=False))


def flatten_params(params):
    """[(W, b), ...] -> 1-D vector (W row-major, then b, per layer)."""
    return np.concatenate([np.concatenate([W.ravel(), b.ravel()]) for W, b in params])


def unflatten_batch(flat, layer_sizes):
    """(K, P) flat weight sets -> [(W (K, m, n), b (K, n)), ...]; differentiable."""
    K, shapes = flat.shape[0], list(zip(layer_sizes[:-1], layer_sizes[1:], strict=False))
    if num_params(layer_sizes) != flat.shape[1]:
        raise ValueError(f"flat weights have {flat.shape[1]} entries, layer sizes {layer_sizes} need "
                         f"{num_params(layer_sizes)}")
    # One split instead of slices: its gradient is one concatenation, not a zero-filled array per slice.
    cuts = np.cumsum([size for m, n in shapes for size in (m * n, n)])[:-1]
    pieces = np.split(flat, cuts, axis=1)
    return [(np.reshape(pieces[2 * i], (K, m, n)), pieces[2 * i + 1]) for i, (m, n) in enumerate(shapes)]


def stack_params(param_lists):
    """K parameter lists -> one batched list [(W (K, m, n), b (K, n)), ...]."""
    return [(np.stack([p[i][0] for p in param_lists]), np.stack([p[i][1] for p in param_lists]))
            for i in range(len(param_lists[0]))]


# -------------------------------------------------------------------------------------- prediction

def relu(x):
    return np.maximum(x, 0.0)


def identity(x):
    return x


def mlp_predict(params, inputs, activation=relu):
    """Single network: inputs (N, D) -> outputs (N, out); activation between layers, identity at the end."""
    for W, b in params[:-1]:
        inputs = activation(np.dot(inputs, W) + b)
    W, b = params[-1]
    return np.dot(inputs, W) + b


def batched_linear(inputs, W, b):
    """K affine maps at once: inputs (N, D) shared or (K, N, D), W (K, D, O), b (K, O) -> (K, N, O)."""
    if inputs.ndim == 2:
        # One GEMM against all K weight matrices side by side: (N, D) @ (D, K*O).
        K, D, n_out = W.shape
        wide = np.reshape(np.transpose(W, (1, 0, 2)), (D, K * n_out))
        out = np.transpose(np.reshape(np.dot(inputs, wide), (inputs.shape[0], K, n_out)), (1, 0, 2))
    else:
        out = np.matmul(inputs, W)
    return out + b[:, None, :]


def batched_mlp_predict(batched_params, inputs, activation=relu):
    """K networks on one input batch: batched params [(W (K,m,n), b (K,n))], inputs (N, D) -> (K, N, out)."""
    for W, b in batched_params[:-1]:
        inputs = activation(batched_linear(inputs, W, b))
    W, b = batched_params[-1]
    return batched_linear(inputs, W, b)


# ------------------------------------------------------------------------------------------ losses

def gaussian_nll(predictions, targets):
    """Mean of -log N(t | y, 0.1) over the last two axes: (..., N, C) -> (...). Released code's loss."""
    return np.mean(50.0 * (predictions - targets) ** 2, axis=(-2, -1)) + LOG_SIGMA_CONST


def mse(predictions, targets):
    """Mean squared error over the last two axes: (..., N, C) -> (...)."""
    return np.mean((predictions - targets) ** 2, axis=(-2, -1))


def softmax_cross_entropy(logits, targets):
    """Mean cross-entropy over the last two axes: logits, one-hot targets (..., N, C) -> (...)."""
    log_probs = logits - sps.logsumexp(logits, axis=-1, keepdims=True)
    return -np.mean(np.sum(targets * log_probs, axis=-1), axis=-1)


# ------------------------------------------------------------------------------------ regularisers

def norm_regulariser(flat_weights, lam):
    """exp(lambda) * ||w||_2 (unsquared, all weights): flat (K, P), lam (K,) -> (K,). SPEC section 2."""
    # np.linalg.norm: same numbers as sqrt(sum(w**2)), and its gradient w * g / norm is one pass over w
    return np.exp(lam) * np.linalg.norm(flat_weights, axis=1)


def class_norm_regulariser(W, lam):
    """(1/10) sum_i ||W[:, i] exp(lambda_i)||_2 over output columns: W (K, D, C), lam (K, C) -> (K,)."""
    column_norms = np.linalg.norm(W, axis=1)  # (K, C)
    return np.sum(np.exp(lam) * column_norms, axis=1) / W.shape[2]


def per_weight_l2(flat_weights, lam):
    """sum_j exp(lambda_j) w_j^2, one decay per weight: flat (K, P), lam (K, P) -> (K,)."""
    return np.sum(np.exp(lam) * flat_weights ** 2, axis=1)


# --------------------------------------------------------------------------------- hypernetworks

def hypernet_weights(hyper_params, lambdas, activation=relu):
    """Hypernetwork forward: lambdas (K, H) -> flat elementary weights (K, P).

    Global [1, 50, P] uses ReLU; linear [H, P] has no hidden layer; factorised linear [H, r, P] passes
    activation=identity (a linear bottleneck of r units)."""
    return mlp_predict(hyper_params, lambdas, activation)


def init_hypernet(kind, n_hypers, n_weights, init_scale, rs, hidden=None):
    """Hypernetwork parameters: kind 'mlp' [H, hidden, P] (ReLU), 'linear' [H, P], 'factorised' [H, hidden, P]."""
    if kind == "linear":
        sizes = [n_hypers, n_weights]
    elif kind in ("mlp", "factorised"):
        if not hidden:
            raise ValueError(f"a {kind} hypernetwork needs a hidden size")
        sizes = [n_hypers, hidden, n_weights]
    else:
        raise ValueError(f"unknown hypernetwork kind {kind!r}")
    return init_mlp(sizes, init_scale, rs)


def hypernet_activation(kind):
    """The hidden activation of a hypernetwork kind."""
    return relu if kind == "mlp" else identity


# ----------------------------------------------------- K linear models side by side ("wide" layout)
# Column k*O + c of W_wide (D, K*O) is W_k[:, c]. Predictions of all K models are then one GEMM
# (N, D) @ (D, K*O) that reads the weights in place, and the weight gradient comes out of one GEMM in the
# same layout; the (K, D, O) layout of batched_linear needs a transposed copy of all weights each way.

def to_wide(W, b):
    """Stacked linear models W (K, D, O), b (K, O) -> side by side W_wide (D, K*O), b_wide (K*O,)."""
    K, D, n_out = W.shape
    return np.reshape(np.transpose(W, (1, 0, 2)), (D, K * n_out)), np.reshape(b, (K * n_out,))


def from_wide(W_wide, b_wide, n_out):
    """Inverse of to_wide: W_wide (D, K*O), b_wide (K*O,) -> W (K, D, O), b (K, O)."""
    D, K = W_wide.shape[0], W_wide.shape[1] // n_out
    return np.transpose(np.reshape(W_wide, (D, K, n_out)), (1, 0, 2)), np.reshape(b_wide, (K, n_out))


def wide_linear(inputs, W_wide, b_wide, n_out):
    """K linear models side by side on one input batch: inputs (N, D) -> (K, N, O)."""
    out = np.reshape(np.dot(inputs, W_wide) + b_wide, (inputs.shape[0], -1, n_out))  # (N, K, O)
    return np.transpose(out, (1, 0, 2))


def wide_class_norm_regulariser(W_wide, lam):
    """class_norm_regulariser of side-by-side weights: W_wide (D, K*C), lam (K, C) -> (K,)."""
    K, C = lam.shape
    column_norms = np.reshape(np.linalg.norm(W_wide, axis=0), (K, C))  # ||W_k[:, c]||
    return np.sum(np.exp(lam) * column_norms, axis=1) / C
