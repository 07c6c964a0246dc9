//! A flat token trie of a vocabulary: nodes in depth-first preorder, so that a walk is one pass
//! over an array and a rejected byte skips its whole subtree with one jump.

use crate::sampling::TokenId;

/// One trie node (12 bytes): the byte on the edge into it, its depth, where its subtree ends,
/// and the tokens whose bytes end exactly here (a range of [`TokenTrie::token_ids`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Node {
    /// Index one past the last node of this node's subtree.
    pub subtree_end: u32,
    /// First of this node's tokens in `token_ids`.
    pub tok_start: u32,
    /// Depth (the root is 0; a node at depth `d` ends a `d`-byte string).
    pub depth: u16,
    /// How many tokens end here (several when tokens share bytes, e.g. `▁` and `<0x20>`).
    pub n_tok: u8,
    /// The byte on the edge from the parent.
    pub byte: u8,
}

/// A flat trie over the non-empty bytes of the ordinary (non-special) tokens of a vocabulary.
#[derive(Debug, Clone)]
pub struct TokenTrie {
    nodes: Vec<Node>,
    token_ids: Vec<TokenId>,
    max_depth: usize,
}

impl TokenTrie {
    /// Builds the trie of `tokens` (id, bytes); empty byte strings are skipped.
    pub fn new<'a>(tokens: impl IntoIterator<Item = (TokenId, &'a [u8])>) -> TokenTrie {
        let mut toks: Vec<(TokenId, &[u8])> =
            tokens.into_iter().filter(|(_, b)| !b.is_empty()).collect();
        toks.sort_unstable_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(&b.0)));
        let mut nodes = vec![Node {
            subtree_end: 0,
            tok_start: 0,
            depth: 0,
            n_tok: 0,
            byte: 0,
        }];
        // `path[d]` is the node at depth `d` on the current path (path[0] = root).
        let mut path: Vec<usize> = vec![0];
        let mut prev: &[u8] = &[];
        let mut token_ids = Vec::with_capacity(toks.len());
        let mut max_depth = 0;
        for (i, &(id, bytes)) in toks.iter().enumerate() {
            let bytes = &bytes[..bytes.len().min(u16::MAX as usize)];
            let lcp = prev.iter().zip(bytes).take_while(|(a, b)| a == b).count();
            if lcp == bytes.len() && lcp == prev.len() && i > 0 {
                let last = *path.last().expect("non-empty path");
                if nodes[last].n_tok < u8::MAX {
                    nodes[last].n_tok += 1;
                    token_ids.push(id);
                }
                continue;
            }
            while path.len() > lcp + 1 {
                let n = path.pop().expect("non-empty path");
                nodes[n].subtree_end = nodes.len() as u32;
            }
            for (d, &b) in bytes.iter().enumerate().skip(lcp) {
                path.push(nodes.len());
                nodes.push(Node {
                    subtree_end: 0,
                    tok_start: token_ids.len() as u32,
                    depth: (d + 1) as u16,
                    n_tok: 0,
                    byte: b,
                });
            }
            let last = *path.last().expect("non-empty path");
            nodes[last].n_tok = 1;
            nodes[last].tok_start = token_ids.len() as u32;
            token_ids.push(id);
            max_depth = max_depth.max(bytes.len());
            prev = bytes;
        }
        while let Some(n) = path.pop() {
            nodes[n].subtree_end = nodes.len() as u32;
        }
        TokenTrie {
            nodes,
            token_ids,
            max_depth,
        }
    }

    /// The nodes, root first, in depth-first preorder.
    pub(crate) fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The tokens of `node`.
    #[inline(always)]
    pub(crate) fn tokens_of(&self, node: &Node) -> &[TokenId] {
        let s = node.tok_start as usize;
        &self.token_ids[s..s + node.n_tok as usize]
    }

    /// The longest token, in bytes.
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// Number of nodes (including the root).
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }
}
