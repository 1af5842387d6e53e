"""A PyTorch reference of the method, written from docs/method.md: networks, loss, one
SGD step.

The parity tests and bench/experiments/torch_parity.py run it beside our JAX code on the
same weights, batch and Gumbel noise. Modules carry the original's names (encoder =
torchvision ResNet whose `fc` is the projector, predictor, cluster_projector,
cluster_assigner, target_encoder), so its state_dict has the original checkpoint's keys;
the code itself is written from that description, not taken from the original. Needs
torch and torchvision (requirements-torch.txt).
"""
import copy
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

BYOL_TYPE = ('clubyol', 'byol')


def torch_backbone(name: str) -> nn.Module:
    """torchvision ResNet with zero-init residuals, no pretrained weights.

    'resnet10' (one BasicBlock per stage) is torchvision's ResNet class at half the depth
    of resnet18: the same code paths for quicker parity tests.
    """
    if name == 'resnet10':
        from torchvision.models.resnet import BasicBlock, ResNet
        return ResNet(BasicBlock, [1, 1, 1, 1], zero_init_residual=True)
    factory = {'resnet18': torchvision.models.resnet18,
               'resnet50': torchvision.models.resnet50}[name]
    return factory(weights=None, zero_init_residual=True)


def projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN(no affine); the last bias frozen
    (docs/method.md §2)."""
    layers = nn.Sequential(
        nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
        nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
        nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim, affine=False))
    layers[6].bias.requires_grad = False
    return layers


def torch_encoder(backbone: str, feat_size: int) -> nn.Module:
    net = torch_backbone(backbone)
    net.fc = projector(net.fc.in_features, feat_size)
    return net


def resnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled trunk output of a torchvision ResNet, whatever its `fc` is."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)


class ReferenceNetwork(nn.Module):
    """CluSiam / CluBYOL with the original's module names; `view(x)` runs one view."""

    def __init__(self, method: str = 'clusiam', backbone: str = 'resnet18',
                 feat_size: int = 2048, pred_hidden: int = 512, num_clusters: int = 100):
        super().__init__()
        self.method = method
        byol = method in BYOL_TYPE
        self.encoder = torch_encoder(backbone, feat_size)
        self.predictor = nn.Sequential(
            nn.Linear(feat_size, pred_hidden, bias=byol), nn.BatchNorm1d(pred_hidden),
            nn.ReLU(inplace=True), nn.Linear(pred_hidden, feat_size))
        hidden = feat_size if byol else pred_hidden
        self.cluster_projector = nn.Sequential(
            nn.Linear(feat_size, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        self.cluster_assigner = nn.Sequential(nn.Linear(hidden, num_clusters))
        if byol:
            self.target_encoder = copy.deepcopy(self.encoder)
            for p in self.target_encoder.parameters():
                p.requires_grad = False

    def view(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = resnet_features(self.encoder, x)
        z = self.encoder.fc(features)
        return {'features': features, 'z': z, 'p': self.predictor(z),
                'logits': self.cluster_assigner(self.cluster_projector(z))}


def cluster_similarity(reps, logits, gumbel):
    """docs/method.md §4 steps 1-6, with the Gumbel noise given."""
    reps = F.normalize(reps.detach(), dim=1, eps=1e-8)
    soft = torch.softmax(logits + gumbel, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    assign = hard - soft.detach() + soft
    counts = assign.sum(dim=0)
    centroids = assign.T @ reps / torch.clamp(counts, min=1.0)[:, None]
    centroids = F.normalize(centroids, dim=1, eps=1e-8)
    upper = torch.triu(centroids @ centroids.T, diagonal=1).flatten()
    nonzero = upper[upper != 0]
    if nonzero.numel() == 0:
        return torch.ones((), dtype=reps.dtype)
    return nonzero.mean()


def invariance(method: str, out1, out2, targets=None):
    cos = F.cosine_similarity
    if method in BYOL_TYPE:
        t1, t2 = targets
        return (1 - cos(out1['p'], t2.detach(), dim=-1).mean()
                + 1 - cos(out2['p'], t1.detach(), dim=-1).mean())
    return -(cos(out1['p'], out2['z'].detach(), dim=-1).mean()
             + cos(out2['p'], out1['z'].detach(), dim=-1).mean())


def make_sgd(model: ReferenceNetwork, lr: float, momentum: float = 0.9,
             weight_decay: float = 1e-4, fix_pred_lr: bool = False):
    """torch SGD (coupled decay); with fix_pred_lr the predictor is its own group."""
    trainable = lambda module: [p for p in module.parameters() if p.requires_grad]
    groups = [{'params': trainable(m), 'fix_lr': False}
              for m in (model.encoder, model.cluster_projector, model.cluster_assigner)]
    groups.append({'params': trainable(model.predictor), 'fix_lr': fix_pred_lr})
    return torch.optim.SGD(groups, lr, momentum=momentum, weight_decay=weight_decay)


def set_epoch_lr(optimizer, init_lr: float, epoch: int, epochs: int):
    """Per-epoch cosine (docs/method.md §5); fixed-lr groups keep init_lr."""
    import math
    lr = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    for group in optimizer.param_groups:
        group['lr'] = init_lr if group['fix_lr'] else lr


def train_step(model: ReferenceNetwork, optimizer, x1, x2, gumbel, alpha: float,
               ema_momentum: float = 0.99) -> Dict[str, float]:
    """One step as docs/method.md §3-§5: training mode, each module once per view (view 1 first),
    L = (1 - alpha) L_inv + alpha S, SGD, then the EMA of the target's parameters."""
    model.train()
    targets = None
    if model.method in BYOL_TYPE:
        with torch.no_grad():
            targets = [model.target_encoder(x) for x in (x1, x2)]
    out1, out2 = model.view(x1), model.view(x2)
    inv = invariance(model.method, out1, out2, targets)
    reps = torch.cat([out1['z'], out2['z']])
    logits = torch.cat([out1['logits'], out2['logits']])
    sim = cluster_similarity(reps, logits, gumbel)
    loss = (1 - alpha) * inv + alpha * sim
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if model.method in BYOL_TYPE:
        with torch.no_grad():
            for t, o in zip(model.target_encoder.parameters(), model.encoder.parameters()):
                t.mul_(ema_momentum).add_(o, alpha=1 - ema_momentum)
    return {'loss': loss.item(), 'invariance': inv.item(), 'cluster_similarity': sim.item()}


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Move every BatchNorm away from its init (affine and running statistics), so parity
    checks exercise every variable: zero-init residual scales would hide a misplaced
    tensor. (The frozen projector bias keeps its non-zero Linear init.)"""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                module.num_batches_tracked.fill_(123)
                if module.affine:
                    module.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                    module.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model
