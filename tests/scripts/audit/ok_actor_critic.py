"""Control: two models, two optimizers; each clipped right after its own backward, both stepped
at the end. The critic's backward runs after the actor's clip but never writes the actor's gradients."""
import sys

import torch

torch.manual_seed(0)
actor = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
critic = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
actor_opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
for step in range(15):
    s = torch.randn(32, 6)
    actor_opt.zero_grad()
    critic_opt.zero_grad()
    value = critic(s).detach()
    actor_loss = -(torch.log_softmax(actor(s), -1)[:, 0] * value.squeeze(1)).mean()
    actor_loss.backward()
    torch.nn.utils.clip_grad_norm_(actor.parameters(), 0.5)
    critic_loss = (critic(s) - s.sum(1, keepdim=True)).pow(2).mean()
    critic_loss.backward()
    torch.nn.utils.clip_grad_norm_(critic.parameters(), 0.5)
    actor_opt.step()
    critic_opt.step()
if len(sys.argv) > 1:
    torch.save({"actor": actor.state_dict(), "critic": critic.state_dict()}, sys.argv[1])
