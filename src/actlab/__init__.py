"""actlab: what does an activation function do to a network's training?"""
