"""The stock ClientApp: Flower's quickstart handlers, nothing fedwa-specific."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from stock_app.task import Net, load_partition, test, train

#: Local epochs and learning rate, as a quickstart app reads them from its run config.
LOCAL_EPOCHS = 1
LR = 0.1

app = ClientApp()


def round_seed(server_round: int, partition_id: int) -> int:
    """The batch order of a client's round, so runs can be compared model for model."""
    return 1000 * server_round + partition_id


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received model on the local partition."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid = int(context.node_config["partition-id"])
    x, y = load_partition(pid, int(context.node_config["num-partitions"]))
    config = msg.content["config"]
    loss = train(model, x, y, epochs=LOCAL_EPOCHS, lr=LR,
                 seed=round_seed(int(config["server-round"]), pid))
    metrics = {"train_loss": loss, "num-examples": len(x),
               # What the strategy asked for, so the test can see it arrived (FedProx).
               "proximal-mu": float(config.get("proximal-mu", -1.0))}
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local partition."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_partition(int(context.node_config["partition-id"]),
                          int(context.node_config["num-partitions"]))
    loss, accuracy = test(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(x)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
