"""Plain-torch reference math and shared layers: attention, the diffusion tables and update, the
diffusion head, categorical sampling, and the CPU-packed linear products."""
