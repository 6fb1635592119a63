"""The pattern of pytorch/examples' word language model (main.py): an LSTM language model
trained with a hand-written SGD update after clip_grad_norm_, no optimizer object. Data are
generated here (a small synthetic corpus). Prints one line per batch: step, loss, the norm
clip_grad_norm_ returned (pre-clip)."""

import argparse
import math

import torch
import torch.nn as nn

parser = argparse.ArgumentParser(description="PyTorch LSTM language model (synthetic corpus)")
parser.add_argument("--emsize", type=int, default=16)
parser.add_argument("--nhid", type=int, default=32)
parser.add_argument("--lr", type=float, default=20)
parser.add_argument("--clip", type=float, default=0.25, help="gradient clipping")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batch_size", type=int, default=8)
parser.add_argument("--bptt", type=int, default=12)
parser.add_argument("--seed", type=int, default=1111)
args = parser.parse_args()

torch.manual_seed(args.seed)
ntokens = 50
corpus = torch.randint(0, ntokens, (2000,))


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


train_data = batchify(corpus, args.batch_size)


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid)
        self.decoder = nn.Linear(nhid, ntoken)

    def forward(self, input, hidden):
        output, hidden = self.rnn(self.encoder(input), hidden)
        return self.decoder(output).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(1, bsz, self.rnn.hidden_size), weight.new_zeros(1, bsz, self.rnn.hidden_size))


model = RNNModel(ntokens, args.emsize, args.nhid)
criterion = nn.NLLLoss()


def repackage_hidden(h):
    return tuple(v.detach() for v in h)


def get_batch(source, i):
    seq_len = min(args.bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


step = 0


def train():
    global step
    model.train()
    hidden = model.init_hidden(args.batch_size)
    for i in range(0, train_data.size(0) - 1, args.bptt):
        data, targets = get_batch(train_data, i)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(torch.log_softmax(output, dim=-1), targets)
        loss.backward()
        # `clip_grad_norm` helps prevent the exploding gradient problem in RNNs / LSTMs.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-args.lr)
        step += 1
        print(f"step {step} loss {loss.item():.10g} norm {float(norm):.10g} ppl {math.exp(loss.item()):.2f}", flush=True)


for epoch in range(1, args.epochs + 1):
    train()
