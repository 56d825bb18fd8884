"""The stock ClientApp grown by the protocols fedwa documents for partial averaging, WSA and
TWA-t's gradient rounds (notes: "fedwa strategies in your own Flower app"), using fedwa's
helpers for the piece names and the scope term, and nothing else of fedwa."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedwa.core.partial import merge, select
from fedwa.core.wsa import scope_kl, scope_regulariser
from stock_app.client_app import LOCAL_EPOCHS, LR, round_seed
from stock_app.task import Net, load_partition, test, train

#: Where the client keeps its own model between rounds (partial averaging).
OWN_MODEL = "own-model"

app = ClientApp()


def _data(context: Context) -> tuple[int, torch.Tensor, torch.Tensor]:
    pid = int(context.node_config["partition-id"])
    return (pid, *load_partition(pid, int(context.node_config["num-partitions"])))


def _record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    # Row pieces are views; an ArrayRecord wants whole, contiguous tensors.
    return ArrayRecord({k: v.detach().contiguous().clone() for k, v in state.items()})


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    received = msg.content["arrays"].to_torch_state_dict()
    model = Net()
    if config.get("keep-local-model"):
        # Partial averaging: write the received pieces into the model this client keeps.
        own = (context.state[OWN_MODEL].to_torch_state_dict() if OWN_MODEL in context.state
               else model.state_dict())
        model.load_state_dict(merge(own, received))
    else:
        model.load_state_dict(received)
    regulariser = targets = None
    if "wsa-lambda" in config:
        names = list(config["wsa-names"])
        targets = {n: (torch.tensor(mu), torch.tensor(sigma))
                   for n, mu, sigma in zip(names, config["wsa-mu"], config["wsa-sigma"])}
        regulariser = scope_regulariser(targets, names, float(config["wsa-lambda"]))
    pid, x, y = _data(context)
    loss = train(model, x, y, epochs=LOCAL_EPOCHS, lr=LR,
                 seed=round_seed(int(config["server-round"]), pid), regulariser=regulariser)
    state = model.state_dict()
    metrics = {"train_loss": loss, "num-examples": len(x), "partition-id": pid}
    if targets is not None:
        with torch.no_grad():
            metrics["wsa-kl"] = float(scope_kl(state, targets, list(targets)))
    if config.get("keep-local-model"):
        context.state[OWN_MODEL] = _record(state)
    names = config.get("return-names")
    reply = select(state, list(names)) if names else state
    return Message(content=RecordDict({"arrays": _record(reply),
                                       "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train("gradient")
def gradient_handler(msg: Message, context: Context) -> Message:
    """TWA-t: the gradient of the mean training loss at the received weights."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, x, y = _data(context)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    grads = {name: (params[name].grad if name in params else torch.zeros_like(value))
             for name, value in model.state_dict().items()}
    return Message(content=RecordDict({"arrays": _record(grads),
                                       "metrics": MetricRecord({"num-examples": len(x)})}),
                   reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    model = Net()
    if config.get("evaluate-local-model"):  # partial averaging: the model this client keeps
        model.load_state_dict(context.state[OWN_MODEL].to_torch_state_dict())
    else:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, x, y = _data(context)
    loss, accuracy = test(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(x)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
