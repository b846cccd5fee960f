"""Dictionary files: mechscope's own folders, and exchange with SAELens and EleutherAI's sparsify."""
