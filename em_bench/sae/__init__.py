"""Sparse autoencoders and latents: what BLOCK-EM holds still, and how em-bench finds it.

- layers: a model's decoder blocks and sae-lens's hook name for the residual after one;
- training: capturing the residual stream, training, measuring, loading and caching sae-lens SAEs
  (the organism's own, `em-bench sae`);
- latents: latent sets (the SAE and direction forms) and their readouts;
- discover: finding a misaligned fine-tune's latents (`em-bench discover`, the three-stage screen);
- concepts: the concept vectors of `em-bench analyze concepts`.

Nothing is imported here: import the module you need (the SAE code loads torch, sae-lens more).
"""
