"""methods/trigger"""
